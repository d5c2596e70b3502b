"""HeLlO end to end: teachers -> select -> transfer -> refine -> evaluate -> report.

    python jobs/distill.py                                   # the demo preset on a local Ray
    python jobs/distill.py --preset smoke --store s3://bucket/runs
    ray job submit --working-dir . -- python jobs/distill.py --preset imagenet1k data.source=s3://...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hello_ray.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
