"""HeLlO end to end: teachers -> select -> transfer -> refine -> evaluate -> report.

    python jobs/distill.py                                   # the demo preset on a local Ray
    python jobs/distill.py --preset smoke --store s3://bucket/runs
    ray job submit --working-dir . -- python jobs/distill.py --preset imagenet1k data.source=s3://...

It imports the installed hello_ray (README: Install); under ``ray job submit --working-dir .``
Ray puts the working dir on the path itself. ``hello-ray distill`` is the same command.
"""
import sys

from hello_ray.cli.distill import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
