"""Ray Tune sweep over LoRA ranks and teacher windows on a shared selection.

    python jobs/sweep.py --preset smoke
    python jobs/sweep.py --preset imagenet1k data.source=s3://... sweep.scheduler=asha
"""
import sys

from hello_ray.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
