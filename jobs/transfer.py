"""LoRA knowledge transfer (METHOD.md stage 3): fit the CLIP projector to a teacher window.

    python jobs/transfer.py                                  # demo preset, local Ray
    python jobs/transfer.py --preset smoke transfer.epochs=3
    ray job submit --working-dir . -- python jobs/transfer.py --preset imagenet1k data.source=s3://...

The teacher trajectory it needs is reused when finished (same config -> same key) or trained first.
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.recipe import run_transfer


def main(argv: list[str]) -> int:
    _, store, key = stage_job(argv, run_transfer, __doc__.splitlines()[0])
    print(store.uri_for(key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
