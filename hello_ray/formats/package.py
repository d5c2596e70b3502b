"""The distilled-set package (``hello-ray export``; read by ``hello_ray.distilled.open``).

A package is one folder (local, or a prefix on S3) holding everything a receiver needs to train
on the distilled set, and nothing of the run that made it:

  ``images/<class folder>/<i:05d>.png``  the distilled images, lossless uint8 RGB PNG, one folder per
                                         class; ``i`` is the image's position in the set (the order
                                         stored labels replay), unique over the whole package
  ``classes.json``                       {"class_names": [...], "folders": [...]}: class c is
                                         ``class_names[c]``, its images live in ``folders[c]``
  ``adapter/adapter.safetensors`` +      the projector's LoRA and the JSON that rebuilds it from the
  ``adapter/adapter.json``               public CLIP (hello_ray/models/adapter.py), when shipped
  ``labels/stored[-N]/...``              stored soft labels as evaluate wrote them, when shipped
  ``package.json``                       what the package holds (PACKAGE_FORMAT, counts, image size,
                                         the projector's rebuild settings, the source artifact keys)
  ``README.md`` + grid PNGs              the dataset card (hello_ray/distilled/card.py)
  ``manifest.json``                      every file's size and sha256, written last (the store's
                                         ``finalize``): a package without it is unfinished

Class folders are ``<c:04d>-<slug of the name>``: the index keeps the class order explicit and
the folders sorted in it; the slug only helps a human (a name may hold '/' or be empty).
"""
from __future__ import annotations

import json
import re
from typing import Any

from hello_ray.data.classnames import CLASS_FILES

PACKAGE_STAGE = "package"        # the manifest's "stage"
PACKAGE_FORMAT = 1
PACKAGE_JSON = "package.json"
CLASSES_JSON = CLASS_FILES[0]  # {"class_names", "folders"}: a dataset reader takes it too
CARD = "README.md"
IMAGES_DIR = "images"
ADAPTER_DIR = "adapter"
LABELS_DIR = "labels"            # the same folder name evaluate writes (hello_ray/labels/stored.py)
LABEL_KINDS = ("projector", "stored")   # what ``--labels`` may ship besides the class folders
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")
_IMAGE = re.compile(r"^images/(\d{4})-[A-Za-z0-9_.-]*/(\d{5,})\.png$")


class PackageError(ValueError):
    """A package that is malformed (names the package URI and the file at fault)."""


def class_folder(c: int, name: str) -> str:
    """``0003-three``: the class index first (order), then a file-safe slug of the name."""
    slug = _SLUG.sub("_", str(name)).strip("._")[:40]
    return f"{c:04d}-{slug}" if slug else f"{c:04d}"


def image_file(folder: str, i: int) -> str:
    return f"{IMAGES_DIR}/{folder}/{i:05d}.png"


def parse_image_file(name: str) -> tuple[int, int] | None:
    """``images/0003-three/00017.png`` -> (class 3, image 17); None for any other name."""
    m = _IMAGE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def classes_doc(class_names: list[str]) -> dict[str, Any]:
    return {"class_names": list(class_names),
            "folders": [class_folder(c, n) for c, n in enumerate(class_names)]}


def check_classes_doc(doc: Any, where: str) -> tuple[list[str], list[str]]:
    """(class names, folders) of a ``classes.json``; PackageError naming ``where`` otherwise."""
    if not isinstance(doc, dict) or not isinstance(doc.get("class_names"), list) \
            or not isinstance(doc.get("folders"), list):
        raise PackageError(f"{where}: expected {{\"class_names\": [...], \"folders\": [...]}}")
    names, folders = [str(n) for n in doc["class_names"]], [str(f) for f in doc["folders"]]
    if len(names) != len(folders) or not names:
        raise PackageError(f"{where}: {len(names)} class names but {len(folders)} folders")
    want = [class_folder(c, n) for c, n in enumerate(names)]
    if folders != want:
        bad = next(c for c, (f, w) in enumerate(zip(folders, want)) if f != w)
        raise PackageError(f"{where}: class {bad} ({names[bad]!r}) has folder {folders[bad]!r}, "
                           f"expected {want[bad]!r} (class index first, in class order)")
    return names, folders


def image_index(files: list[str], folders: list[str], where: str) -> tuple[list[str], list[int]]:
    """The package's image files in set order and their labels, from the names alone.

    Every image must sit in its class's folder, and the indices must be 0..N-1 without a gap:
    a missing or stray image is an error, not a silently shorter set."""
    found: dict[int, tuple[str, int]] = {}
    for name in files:
        if not name.startswith(IMAGES_DIR + "/"):
            continue
        parsed = parse_image_file(name)
        if parsed is None or parsed[0] >= len(folders) or not name.startswith(f"{IMAGES_DIR}/{folders[parsed[0]]}/"):
            raise PackageError(f"{where}: {name!r} is not images/<class folder of classes.json>/<index>.png")
        c, i = parsed
        if i in found:
            raise PackageError(f"{where}: image index {i} appears twice ({found[i][0]}, {name})")
        found[i] = (name, c)
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))[:5]
        raise PackageError(f"{where}: image indices are not 0..{len(found) - 1}; missing {missing}")
    return [found[i][0] for i in range(len(found))], [found[i][1] for i in range(len(found))]


def read_json_file(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{where}: not valid JSON: {e}") from None


def check_package_doc(doc: Any, where: str) -> dict[str, Any]:
    """A ``package.json``: the format this code reads and the keys readers use."""
    if not isinstance(doc, dict):
        raise PackageError(f"{where}: expected a JSON object")
    if doc.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{where}: package format {doc.get('format')!r}; this hello_ray reads "
                           f"format {PACKAGE_FORMAT}")
    missing = [k for k in ("num_images", "num_classes", "image_size", "labels", "source") if k not in doc]
    if missing:
        raise PackageError(f"{where}: missing keys {missing}")
    return doc
