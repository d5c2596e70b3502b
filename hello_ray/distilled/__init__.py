"""A distilled set as a product: ``open`` a package made by ``hello-ray export`` and train on it.

    import hello_ray.distilled
    pkg = hello_ray.distilled.open("s3://bucket/packages/digits-ipc2")
    pkg.images, pkg.labels, pkg.class_names            # uint8 [N,3,H,W], int64 [N], list[str]
    labeller = pkg.labeller("projector", device="cuda")  # augmented [B,3,H,W] in [0,1] -> logits [B,C]

Nothing on this path imports Ray or needs the store of the run that made the package; the export
side (``hello_ray.distilled.export``) is imported only by ``hello-ray export``.
"""
from hello_ray.distilled.package import DistilledSet, Labeller, open_package

open = open_package  # noqa: A001 - the package's one entry point reads as hello_ray.distilled.open(uri)

__all__ = ["DistilledSet", "Labeller", "open", "open_package"]
