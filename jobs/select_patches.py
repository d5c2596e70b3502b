"""Stage 2 alone: RDED patch selection (teachers first, cached) and print where the image set went.

    python jobs/select_patches.py                                  # demo preset, local Ray
    python jobs/select_patches.py --preset smoke select.factor=1 select.show=pad
    ray job submit --working-dir . -- python jobs/select_patches.py --preset imagenet1k \
        data.source=s3://my-bucket/imagenet store=s3://my-bucket/hello_ray select.num_actors=8
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.recipe import run_select


def main(argv: list[str]) -> int:
    cfg, store, key = stage_job(argv, run_select, "RDED patch selection (stage 2)")
    summary = store.manifest(key).get("summary", {})
    print(f"\nselect: {store.uri_for(key)}")
    print(f"images: {summary.get('num_images')} ({cfg.select.ipc} per class, {cfg.select.factor}x"
          f"{cfg.select.factor} patches)   crops scored: {summary.get('crops_scored')}   "
          f"wall time: {summary.get('wall_s')} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
