"""Ray Tune sweep over LoRA ranks and teacher windows on a shared selection.

    python jobs/sweep.py --preset smoke
    python jobs/sweep.py --preset imagenet1k data.source=s3://... sweep.scheduler=asha
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hello_ray.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
