"""Stage 2 from outside: read a distilled set made elsewhere into an image set (no teachers needed).

    python jobs/external.py images.source=external images.path=./rded_out       # RDED's output layout
    python jobs/external.py --preset imagenet1k images.source=external data.source=s3://my-bucket/imagenet \
        images.path=s3://my-bucket/sre2l_ipc50 store=s3://my-bucket/hello_ray   # SRe2L/LPLD's new<c:03d>/...

The folders are mapped onto the training classes (images.class_order / images.class_map) before any
image is read; a mismatch exits 2 naming both orders.
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.config import ConfigError
from hello_ray.recipe import run_external


def _external_only(cfg) -> None:
    if cfg.images.source != "external":
        raise ConfigError(f"config key 'images.source': this job reads an external set, not "
                          f"{cfg.images.source!r}; set images.source=external images.path=<folder>")


def main(argv: list[str]) -> int:
    cfg, store, key = stage_job(argv, run_external, __doc__.splitlines()[0], check_job=_external_only)
    s = store.manifest(key).get("summary", {})
    print(f"\nexternal ({s.get('layout')}, {s.get('path')}): {store.uri_for(key)}")
    print(f"images: {s.get('num_images')} ({s.get('resized')} resized)   wall time: {s.get('wall_s')} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
