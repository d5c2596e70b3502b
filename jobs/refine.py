"""Image refine (METHOD.md stage 4): update the selected images on the LoRA'd projector encoder.

    python jobs/refine.py                                    # demo preset, local Ray
    python jobs/refine.py --preset smoke refine.steps=20 refine.target=detached
    ray job submit --working-dir . -- python jobs/refine.py --preset imagenet1k data.source=s3://...

Its inputs (teachers, selection, transfer) are reused when finished or computed first. It runs
even when refine.enabled=false (that switch only tells the full pipeline to skip it).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hello_ray.pipeline import open_run_store, parse_args, run_stage, setup_logging  # noqa: E402
from hello_ray.runtime import ensure_ray  # noqa: E402
from hello_ray.stages import refine, select, teachers, transfer  # noqa: E402


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = parse_args(argv, prog="refine", description=__doc__.splitlines()[0])
    store = open_run_store(cfg)
    ensure_ray(cfg.compute)
    teachers_key = run_stage(teachers, cfg, store)
    select_key = run_stage(select, cfg, store, {"teachers": teachers_key})
    transfer_key = run_stage(transfer, cfg, store, {"teachers": teachers_key})
    key = run_stage(refine, cfg, store, {"select": select_key, "transfer": transfer_key})
    print(store.uri_for(key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
