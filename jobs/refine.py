"""Image refine (METHOD.md stage 4): update the selected images on the LoRA'd projector encoder.

    python jobs/refine.py                                    # demo preset, local Ray
    python jobs/refine.py --preset smoke refine.steps=20 refine.target=detached
    ray job submit --working-dir . -- python jobs/refine.py --preset imagenet1k data.source=s3://...

Its inputs (teachers, selection, transfer) are reused when finished or computed first. It runs
even when refine.enabled=false (that switch only tells the full pipeline to skip it).
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.recipe import run_refine


def main(argv: list[str]) -> int:
    _, store, key = stage_job(argv, run_refine, __doc__.splitlines()[0])
    print(store.uri_for(key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
