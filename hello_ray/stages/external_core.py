"""Compute of the ``external`` stage: a distilled set made elsewhere, mapped onto our classes.

A distilled set is a tree of class folders with images below them. Three layouts are known:

- **rded**: ``<class:05d>/class<class:05d>_id<i:05d>.jpg`` (LINs-lab/RDED @ 3f6453d
  ``synthesize/main.py`` l. 61-64, ``save_images``); the folder number is the index into the
  class list RDED synthesised from, which RDED lays out as ``00000, 00001, ...`` in the training
  set's own order (``validation/utils.py`` l. 95, ``str(class).zfill(5)``).
- **sre2l**: ``new<class:03d>/class<class:03d>_id<i:03d>.jpg`` (VILA-Lab/SRe2L @ 8d00cba
  ``SRe2L/recover/data_synthesis.py`` l. 129-130; LPLD's class-wise recover writes the same,
  he-y/soft-label-pruning-for-dataset-distillation @ 63eee18 ``recover/data_synthesis_class.py``);
  the number is the class index of the teacher's head (torchvision's sorted ImageNet synsets).
  ``:03d`` widens past 999, so the patterns accept more digits.
- **folders**: any folder names (torchvision's ImageFolder).

Image order: torchvision ImageFolder's (sorted class folders; within one, ``sorted(os.walk)``
then sorted file names), so image ``i`` of the written set is sample ``i`` of an ImageFolder over
the same tree, the index SRe2L's and LPLD's relabel records count in (``formats/fkd.py``).

Class mapping (``map_classes``): explicit, never by a silent shift. By index (the number in an
rded/sre2l folder name, or the sorted position of plain folders), by name (folder = a training
class key or readable name), or by ``images.class_map``. A wrong class count, an unknown name,
two folders on one class, an index out of range, or plain folders named like the training classes
but sorted into another order than the training set's are :class:`ExternalClassError`, naming both
orders.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

import numpy as np

from hello_ray.config import ConfigError
from hello_ray.data.classnames import _few
from hello_ray.data.errors import DataError, EmptyClassError
from hello_ray.data.images import decode_image, decode_resized, is_image_file

LAYOUTS = ("rded", "sre2l", "folders")
# folder pattern, file pattern: the class number of both must agree
PATTERNS: dict[str, tuple[re.Pattern, re.Pattern]] = {
    "rded": (re.compile(r"^(\d{5,})$"), re.compile(r"^class(\d{5,})_id\d{5,}\.[A-Za-z]+$")),
    "sre2l": (re.compile(r"^new(\d{3,})$"), re.compile(r"^class(\d{3,})_id\d{3,}\.[A-Za-z]+$")),
}


class ExternalClassError(DataError, ConfigError):
    """The external set's class folders do not map one to one onto the training set's classes: a
    data error that a config key fixes (images.class_order / class_map), so ``distill`` exits 2 on
    it like on any config error, before compute."""


@dataclass
class ExternalListing:
    """The class folders of an external set (sorted) and their images in ImageFolder order."""
    root: str                                   # as shown to users (URI)
    folders: list[str]
    files: list[list[str]]                      # per folder: filesystem paths, ImageFolder order
    rel: list[list[str]] = field(default_factory=list)   # the same, relative to the root

    @property
    def num_images(self) -> int:
        return sum(len(f) for f in self.files)


def imagefolder_order(rel_paths: list[str]) -> list[int]:
    """Positions of ``rel_paths`` (below one class folder) in torchvision ImageFolder's order:
    ``sorted(os.walk(folder))`` visits directories by path, each directory's files sorted."""
    return sorted(range(len(rel_paths)), key=lambda i: (posixpath.dirname(rel_paths[i]),
                                                         posixpath.basename(rel_paths[i])))


def build_listing(root: str, root_path: str, paths: list[str]) -> ExternalListing:
    """``paths`` (every file below ``root_path``) -> class folders and their image files.

    Files directly in the root belong to no class and, as in ImageFolder, are ignored; so are
    files that are not images. An empty class folder is an EmptyClassError naming it."""
    per: dict[str, list[str]] = {}
    prefix = root_path.rstrip("/") + "/"
    for p in paths:
        rel = p[len(prefix):] if p.startswith(prefix) else p
        if "/" not in rel or not is_image_file(posixpath.basename(rel)):
            continue
        per.setdefault(rel.split("/", 1)[0], []).append(rel)
    folders = sorted(per)
    if not folders:
        raise DataError(f"external distilled set {root}: no class folders with images (expected "
                        "<root>/<class>/<image>.jpg)")
    files, rel = [], []
    for f in folders:
        r = per[f]
        ordered = [r[i] for i in imagefolder_order(r)]
        rel.append(ordered)
        files.append([prefix + x for x in ordered])
    return ExternalListing(root, folders, files, rel)


def add_empty_folders(listing: ExternalListing, dirs: list[str], root_path: str) -> None:
    """Fail on class folders without images (they would silently drop a class)."""
    prefix = root_path.rstrip("/") + "/"
    for d in dirs:
        rel = d[len(prefix):] if d.startswith(prefix) else d
        if rel and "/" not in rel and rel not in listing.folders:
            raise EmptyClassError(rel, f"external distilled set {listing.root}")


def detect_layout(folders: list[str], layout: str, where: str) -> str:
    """The layout of ``folders``: ``layout`` checked, or for ``auto`` the first that names every
    folder (rded, sre2l), else folders."""
    if layout == "folders":
        return layout
    if layout == "auto":
        return next((name for name, (fp, _) in PATTERNS.items() if all(fp.match(f) for f in folders)),
                    "folders")
    if layout not in PATTERNS:
        raise ValueError(f"unknown external layout {layout!r}; use auto, {', '.join(LAYOUTS)}")
    bad = [f for f in folders if not PATTERNS[layout][0].match(f)]
    if bad:
        want = {"rded": "00000, 00001, ... (RDED)", "sre2l": "new000, new001, ... (SRe2L / LPLD)"}[layout]
        raise ExternalClassError(f"external distilled set {where}: images.layout={layout} expects folders named "
                                 f"{want}; these are not: {_few(bad)}")
    return layout


def check_file_names(listing: ExternalListing, layout: str) -> None:
    """In an rded/sre2l tree a file named ``class<c>_...`` must sit in class c's folder."""
    if layout not in PATTERNS:
        return
    fp, filep = PATTERNS[layout]
    for folder, rels in zip(listing.folders, listing.rel):
        c = int(fp.match(folder).group(1))
        for r in rels:
            m = filep.match(posixpath.basename(r))
            if m and int(m.group(1)) != c:
                raise ExternalClassError(f"external distilled set {listing.root}: {r} is named for class "
                                         f"{int(m.group(1))} but lies in folder {folder} (class {c})")


def map_classes(folders: list[str], layout: str, order: str, class_map: dict[str, str],
                train_keys: list[str], train_names: list[str], where: str) -> list[int]:
    """The training class index of every folder (``folders`` sorted). See the module docstring."""
    m = len(train_keys)
    ext_order = f"external folders (sorted): {_few(folders)}"
    train_order = f"training classes (label order): {_pairs(train_keys, train_names)}"
    if len(folders) != m:
        raise ExternalClassError(f"external distilled set {where} has {len(folders)} class folders but the "
                                 f"training set has {m} classes; {ext_order}; {train_order}")
    lookup = _name_lookup(train_keys, train_names)
    if class_map:
        missing = [f for f in folders if f not in class_map]
        unknown = sorted(k for k in class_map if k not in set(folders))
        if missing or unknown:
            raise ExternalClassError(
                f"images.class_map vs external distilled set {where}: "
                + "; ".join(([f"no mapping for folders {_few(missing)}"] if missing else [])
                            + ([f"maps folders the set does not have: {_few(unknown)}"] if unknown else []))
                + f"; {ext_order}; {train_order}")
        return _resolve(folders, [class_map[f] for f in folders], lookup, "images.class_map", where,
                        ext_order, train_order)
    if order == "names":
        return _resolve(folders, folders, lookup, "images.class_order=names", where, ext_order, train_order)
    if layout in PATTERNS:
        idx = [int(PATTERNS[layout][0].match(f).group(1)) for f in folders]
        out_of_range = [f for f, i in zip(folders, idx) if i >= m]
        if out_of_range:
            raise ExternalClassError(f"external distilled set {where} ({layout} layout): folders {_few(out_of_range)} "
                                     f"name class indices beyond the training set's {m} classes (0..{m - 1}); "
                                     f"{ext_order}; {train_order}")
        dup = sorted({f for f, i in zip(folders, idx) if idx.count(i) > 1})
        if dup:  # '00001' and '000001' are both class 1
            raise ExternalClassError(f"external distilled set {where}: folders {_few(dup)} name the same class "
                                     f"index; {ext_order}; {train_order}")
        return idx  # m distinct indices in 0..m-1: a permutation
    # Plain folders by position. Folders named like the training classes but in another order would
    # pair folder i with a different class than its name says: refuse, naming both orders.
    by_name = [lookup.get(f) for f in folders]
    if all(i is not None for i in by_name) and by_name != list(range(m)):
        first = next(i for i, j in enumerate(by_name) if j != i)
        raise ExternalClassError(
            f"external distilled set {where}: its folders are named like the training classes but sort into "
            f"another order (folder {folders[first]!r} is position {first}, training class "
            f"{train_keys[first]!r}); by index it would train class {first} on {folders[first]!r}'s images. "
            f"{ext_order}; {train_order}. Set images.class_order=names to map by name, or images.class_map")
    return list(range(m))


def _name_lookup(keys: list[str], names: list[str]) -> dict[str, int]:
    """Training class key or readable name -> index (keys win where a name equals another key)."""
    out = {n: i for i, n in enumerate(names)}
    out.update({k: i for i, k in enumerate(keys)})
    return out


def _resolve(folders: list[str], targets: list[str], lookup: dict[str, int], how: str, where: str,
             ext_order: str, train_order: str) -> list[int]:
    unknown = [f"{f} -> {t}" if f != t else f for f, t in zip(folders, targets) if t not in lookup]
    if unknown:
        raise ExternalClassError(f"{how}: external distilled set {where}: no training class named "
                                 f"{_few(unknown)}; {ext_order}; {train_order}")
    idx = [lookup[t] for t in targets]
    dup = sorted({i for i in idx if idx.count(i) > 1})
    if dup:
        both = [f for f, i in zip(folders, idx) if i in dup]
        raise ExternalClassError(f"{how}: external distilled set {where}: folders {_few(both)} map to the same "
                                 f"training class; {ext_order}; {train_order}")
    return idx


def decode_external(data: bytes, where: str, size: int, resize: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image -> (uint8 [size, size, 3], its original (H, W)). An image of another size is
    resized by the package's rule (``data/images.fit_square``) when ``resize``, else refused.
    Undecodable bytes raise CorruptImageError naming ``where``."""
    img = decode_image(data, where)
    hw = (int(img.shape[0]), int(img.shape[1]))
    if hw == (size, size):
        return img, hw
    if not resize:
        raise DataError(f"external image {where} is {hw[1]}x{hw[0]} px, not data.image_size {size}x{size}; "
                        "images.resize=true resizes it (shorter side, centre crop)")
    return decode_resized(data, where, size), hw


def _pairs(keys: list[str], names: list[str], n: int = 8) -> str:
    pairs = [f"{i}: {k}" if k == v else f"{i}: {k} ({v})" for i, (k, v) in enumerate(zip(keys[:n], names[:n]))]
    return "[" + ", ".join(pairs) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") + "]"
