"""Preflight of a run: checks (config, store, data, weights, cluster resources), a rehearsal of every
stage at the real shapes, and the cost model. Same as ``hello-ray preflight``.

    python jobs/preflight.py --preset imagenet1k data.source=s3://bucket/imagenet store=s3://bucket/run
    python jobs/preflight.py --preset imagenet1k --cluster cluster/aws.yaml --no-rehearsal ...
"""
import sys

from hello_ray.cli.preflight import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
