"""``python -m hello_ray.cli <command>``: the same as the ``hello-ray`` console script."""
import sys

from hello_ray.cli import main

sys.exit(main())
