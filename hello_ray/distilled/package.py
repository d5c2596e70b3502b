"""Open a distilled-set package (hello_ray/formats/package.py) and use it in plain PyTorch.

``open(uri)`` reads a package made by ``hello-ray export`` from a local folder or ``s3://``: the
images, class names, and (on demand) the projector labeller or the stored labels. It needs no Ray
(nothing here imports it) and no access to the store that made the package. Every file comes in
through the store layer's verified read (``Store.get_bytes`` against the package's manifest), so a
changed or truncated file raises ``IntegrityError`` naming it before its bytes are used.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hello_ray.data.images import decode_image
from hello_ray.formats import package as fmt
from hello_ray.models.adapter import ADAPTER_JSON
from hello_ray.store import ArtifactNotFound, Store, StoreError, is_artifact_key, open_store


def split_uri(uri: str) -> tuple[str, str]:
    """``/a/b/pkg`` or ``s3://bucket/a/pkg`` -> (the store URI above it, the package's key ``pkg``).

    A package is one artifact of the store one level up, so its manifest, verify-on-read and S3
    access are the store's own. The last path component must be a valid key."""
    text = str(uri).rstrip("/")
    if text.startswith("s3://"):
        rest = text[len("s3://"):]
        if "/" not in rest:
            raise StoreError(f"{uri!r}: a package on S3 is s3://bucket/[prefix/]<name>, not a bare bucket")
        parent, name = rest.rsplit("/", 1)
        return f"s3://{parent}", name
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser().absolute()
    return str(path.parent), path.name


def open_package_store(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """(the store holding the package, its key); the store is reached once (a wrong endpoint or a
    missing bucket fails here, naming it)."""
    parent, key = split_uri(uri)
    if not is_artifact_key(key):
        raise StoreError(f"{uri!r}: a package's folder name {key!r} must be letters, digits, '_', '.', '-' "
                         "(not starting with '_', '.' or '-'): it is the package's key in the store above it")
    return open_store(parent, endpoint_url), key


class _ImageDataset(Dataset):
    """(image float [3, H, W] in [0, 1], label int) pairs; ``transform`` applies to the image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div(255.0)       # [3, H, W] in [0, 1]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])


class Labeller(nn.Module):
    """A frozen labeller: ``forward(images [B, 3, H, W] float in [0, 1]) -> logits [B, C] float32``.

    It wraps the very strategy object evaluate labels with (``hello_ray.labels.ProjectorLabels``:
    the adapter merged into CLIP, ``prepare_labeller``, the label precision's autocast,
    ``inference_mode``), so its logits are evaluate's, bit for bit, at the same precision.
    Inputs are moved to the labeller's device; the logits stay there. Choose the device when asking
    for the labeller (``pkg.labeller(device=...)``): that is where it is prepared and its precision
    decided, as in evaluate.
    """

    def __init__(self, strategy: Any):
        super().__init__()
        self.strategy = strategy
        self.model = strategy.model          # registered, so .parameters() / repr show the network
        self.device = strategy.device
        self.precision = strategy.precision
        self.shipped_bytes = strategy.shipped_bytes()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the network's own device: right after a later ``.to()`` too
        device = next(self.model.parameters(), torch.empty(0, device=self.device)).device
        return self.strategy.logits(images.to(device))

    def train(self, mode: bool = True) -> "Labeller":
        return super().train(False)           # frozen: its BatchNorms never leave eval mode


class DistilledSet:
    """A distilled-set package, read into memory.

    ``images``: uint8 [N, 3, H, W] (the stored pixels exactly; divide by 255 for [0, 1]);
    ``labels``: int64 [N] class indices; ``class_names``: list[str], class c = ``class_names[c]``.
    """

    def __init__(self, store: Store, key: str, images: torch.Tensor, labels: torch.Tensor,
                 class_names: list[str], info: dict[str, Any]):
        self.store, self.key = store, key
        self.uri = store.uri_for(key)
        self.images, self.labels, self.class_names = images, labels, class_names
        self.info = info
        self.image_size = int(info["image_size"])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"DistilledSet({self.uri!r}: {len(self)} images of {len(self.class_names)} classes, "
                f"{self.image_size} px, labels {self.info['labels']})")

    def verify(self) -> None:
        """Check every file of the package against its manifest, the card and figures included
        (``open`` checks the files it reads; this checks the rest too). IntegrityError names the file."""
        self.store.verify(self.key)

    def torch_dataset(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Dataset:
        """A ``torch.utils.data.Dataset`` of (image float [3, H, W] in [0, 1], label int)."""
        return _ImageDataset(self.images, self.labels, transform)

    def labeller(self, strategy: str = "projector", device: torch.device | str = "cpu",
                 precision: str | None = None, pretrained: str | None = None) -> Labeller:
        """The soft-label module for augmented batches (see ``Labeller``).

        ``strategy``: ``projector`` (the only online strategy a package ships; stored labels replay
        their own views: ``stored()``). ``precision``: ``auto | fp32 | bf16`` as evaluate's
        ``evaluate.label_precision``; default: the precision the run labelled with.
        ``pretrained``: CLIP weights to use instead of the adapter's (a local file with the same
        content, for an adapter trained on a local weights file; checked by sha256).
        """
        if strategy != "projector":
            raise ValueError(f"{self.uri}: labeller strategy {strategy!r}: a package labels online "
                             "with 'projector' only (stored labels replay their views: .stored())")
        proj = self.info.get("projector")
        if "projector" not in self.info["labels"] or not proj:
            raise ValueError(f"{self.uri}: this package ships no projector adapter (labels: "
                             f"{self.info['labels']}); export it with --labels projector")
        from hello_ray.labels import ProjectorLabels
        from hello_ray.models.projector import load_adapter

        precision = precision or proj.get("label_precision", "auto")
        files = {f"{fmt.ADAPTER_DIR}/{n}": self.store.get_bytes(self.key, f"{fmt.ADAPTER_DIR}/{n}")
                 for n in proj["files"]}
        meta = json.loads(files[f"{fmt.ADAPTER_DIR}/{ADAPTER_JSON}"])
        meta["pretrained"] = _resolve_pretrained(meta["pretrained"], proj, pretrained, self.uri)
        with tempfile.TemporaryDirectory(prefix="hello_ray_adapter_") as tmp:
            for name, data in files.items():
                Path(tmp, Path(name).name).write_bytes(data)
            Path(tmp, ADAPTER_JSON).write_text(json.dumps(meta))
            projector = load_adapter(tmp, merge=True, num_classes=len(self.class_names))
        labels = ProjectorLabels(projector, len(self.class_names), self.image_size,
                                 sum(len(b) for b in files.values()), where=f"package {self.uri}")
        return Labeller(labels.to(torch.device(device)).with_precision(precision))

    def stored(self, prune: int = 1, topk: int = 0):
        """The shipped stored labels (``hello_ray.labels.StoredLabels``: views + fp16 logits to replay;
        ``topk``: LPQLD's top-k labels of ``stored[/prune]@topK``, replayed at a temperature)."""
        from hello_ray.labels import StoredLabels

        if "stored" not in self.info["labels"]:
            raise ValueError(f"{self.uri}: this package ships no stored labels (labels: {self.info['labels']}); "
                             "export it with --labels projector,stored")
        return StoredLabels(self.store, self.key, prune, topk=topk)


def _resolve_pretrained(pretrained: str, proj: dict[str, Any], override: str | None, uri: str) -> str:
    """The CLIP weights to build the projector from, checked against what the adapter was trained on.

    An open_clip tag (``openai``) is public and downloaded by open_clip; ``random-init`` (tests and
    the demo) is regenerated from its seed, so its recipe version must match; a local file must be
    the same file (sha256), given as ``pretrained=`` when the exporter's path does not exist here."""
    from hello_ray.filehash import cached_sha256
    from hello_ray.models.clip import pretrained_identity

    want = proj.get("pretrained_identity")
    candidate = override or pretrained
    if want and want.startswith("file-sha256:"):
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{uri}: the adapter was trained on the local CLIP weights file "
                                    f"{pretrained!r} ({want}); pass labeller(pretrained=<a copy of that file>)")
        got = "file-sha256:" + cached_sha256(candidate)
        if got != want:
            raise ValueError(f"{uri}: CLIP weights {candidate!r} are not the ones the adapter was trained on "
                             f"({got[:24]}... != {want[:24]}...)")
        return candidate
    if want and pretrained_identity(candidate) != want:
        raise ValueError(f"{uri}: the adapter was trained on CLIP weights {want!r}, but {candidate!r} "
                         f"here is {pretrained_identity(candidate)!r} (another hello_ray's random-init "
                         "recipe?); use the hello_ray version recorded in the card")
    return candidate


def open_package(uri: str, endpoint_url: str | None = None) -> DistilledSet:
    """Read the package at ``uri`` (a local folder or ``s3://bucket/prefix/name``).

    ``endpoint_url``: the S3 endpoint (default: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` /
    AWS); credentials come from the standard AWS chain. Raises ``ArtifactNotFound`` for a folder
    without ``manifest.json`` (not a package, or one still being written) and ``IntegrityError``
    naming the file when a file differs from the manifest.
    """
    store, key = open_package_store(uri, endpoint_url)
    where = store.uri_for(key)
    try:
        files = [f["name"] for f in store.manifest(key)["files"]]
    except ArtifactNotFound:
        raise ArtifactNotFound(f"{where}: no manifest.json: not a hello_ray package, or an export that "
                               "did not finish (re-run hello-ray export with --overwrite)") from None
    if fmt.PACKAGE_JSON not in files:
        raise fmt.PackageError(f"{where}: no {fmt.PACKAGE_JSON} in the manifest: not a hello_ray package")
    info = fmt.check_package_doc(fmt.read_json_file(store.get_bytes(key, fmt.PACKAGE_JSON), fmt.PACKAGE_JSON),
                                 f"{where}/{fmt.PACKAGE_JSON}")
    names, folders = fmt.check_classes_doc(
        fmt.read_json_file(store.get_bytes(key, fmt.CLASSES_JSON), fmt.CLASSES_JSON), f"{where}/{fmt.CLASSES_JSON}")
    image_files, labels = fmt.image_index(files, folders, where)
    if len(image_files) != int(info["num_images"]) or len(names) != int(info["num_classes"]):
        raise fmt.PackageError(f"{where}: {fmt.PACKAGE_JSON} says {info['num_images']} images of "
                               f"{info['num_classes']} classes; found {len(image_files)} of {len(names)}")

    def read(name: str) -> np.ndarray:
        return decode_image(store.get_bytes(key, name), f"{where}/{name}")

    # Many small files (S3 GETs release the GIL): read them in parallel; set order is kept.
    with cf.ThreadPoolExecutor(16) as pool:
        arrays = list(pool.map(read, image_files))
    shapes = {a.shape for a in arrays}
    size = int(info["image_size"])
    if shapes - {(size, size, 3)}:
        raise fmt.PackageError(f"{where}: images of shapes {sorted(shapes)}; {fmt.PACKAGE_JSON} says {size} px")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()   # uint8 [N, 3, H, W]
    return DistilledSet(store, key, images, torch.tensor(labels, dtype=torch.int64), names, info)
