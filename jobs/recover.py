"""Stage 2 by synthesis: SRe2L recover or LPLD's class-wise recover (teachers first, cached).

    python jobs/recover.py images.source=lpld                      # demo preset, local Ray
    python jobs/recover.py --preset smoke images.source=sre2l recover.iterations=20
    ray job submit --working-dir . -- python jobs/recover.py --preset imagenet1k images.source=lpld \
        data.source=s3://my-bucket/imagenet store=s3://my-bucket/hello_ray recover.num_actors=8

A crashed run resumes: classes (batches) already finished are kept, the rest are synthesised.
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.recipe import check_recover_source, run_recover


def main(argv: list[str]) -> int:
    cfg, store, key = stage_job(argv, run_recover, __doc__.splitlines()[0],
                                check_job=check_recover_source)
    s = store.manifest(key).get("summary", {})
    print(f"\nrecover ({cfg.images.source}): {store.uri_for(key)}")
    print(f"images: {s.get('num_images')} ({cfg.select.ipc} per class)   objective {s.get('objective_first')} -> "
          f"{s.get('objective_last')}   BN term {s.get('bn_first')} -> {s.get('bn_last')}   "
          f"wall time: {s.get('wall_s')} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
