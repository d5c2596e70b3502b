"""A grid of distilled images per class, and the same images before / after refine.

Rows are classes (all of them up to ``MAX_CLASSES``; for more, ``MAX_CLASSES`` picked evenly over
the label range, so the pick is deterministic and spans the set), named by class name; columns are
that class's first images in set order (at most ``MAX_PER_CLASS``). Only the images shown are read
from the store (``read_images``), so a 10,000-image ImageNet set costs a few hundred reads.

Drawn with PIL, not matplotlib: every thumbnail lands on exact pixels (small images grow by a whole
factor, nearest neighbour; large ones shrink to ``MAX_CELL``), and the PNG carries its layout in a
text chunk (``GRID_META``: origin, cell size, step, rows with class and image indices), so a test
or a tool can find each image in the figure. The same inputs give the same bytes.

``read_image_grid`` (store -> ``ImageGrid``), then ``render_grid`` / ``render_before_after`` (->
PNG bytes) and ``grid_caption`` (-> markdown): the report uses them, a dataset card can too.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from hello_ray.data.errors import DataError
from hello_ray.data.imageset import read_image_set_info, read_images

MAX_CLASSES = 16
MAX_PER_CLASS = 10
BEFORE_AFTER_PER_CLASS = 5  # per side: the pair of panels stays about as wide as the grid
MAX_CELL = 96   # a thumbnail's side at most (ImageNet's 224 px shrink to it)
MIN_CELL = 48   # smaller images (the demo's 32 px) grow by a whole factor to at least this
GAP, PAD, PANEL_GAP = 2, 6, 16
NAME_CHARS = 28  # longer class names are cut in the figure (the caption has them whole)
GRID_META = "hello_ray.grid"


@dataclass
class GridRow:
    label: int                 # class index in the set
    name: str                  # class name
    indices: list[int]         # image indices in the set, in set order
    images: list[np.ndarray] = field(repr=False)  # uint8 [H, W, 3] each


@dataclass
class ImageGrid:
    key: str                   # the image-set artifact
    source: str                # rded | sre2l | lpld (imageset.json "image_source")
    num_images: int
    num_classes: int
    rows: list[GridRow]
    parent: "ImageGrid | None" = None  # the same images before refine, for a refined set


def pick_classes(labels: list[int], max_classes: int = MAX_CLASSES) -> list[int]:
    """The classes that have images, all of them or ``max_classes`` evenly over the label range."""
    present = sorted(set(int(x) for x in labels))
    if len(present) <= max_classes:
        return present
    return [present[i] for i in np.linspace(0, len(present) - 1, max_classes).round().astype(int)]


def pick_images(labels: list[int], label: int, per_class: int = MAX_PER_CLASS) -> list[int]:
    """The first ``per_class`` image indices of class ``label``, in set order."""
    return [i for i, x in enumerate(labels) if int(x) == label][:per_class]


def is_refined(info: dict) -> bool:
    """A refine output: its ``parent`` is the image set it refined. (select and recover also
    record a ``parent``, the teachers, which is not an image set.)"""
    return "refine" in info and bool(info.get("parent"))


def read_image_grid(store, key: str, max_classes: int = MAX_CLASSES, max_per_class: int = MAX_PER_CLASS,
                    with_parent: bool = True) -> ImageGrid:
    """The images the grid shows of image set ``key`` (and of its parent, for a refined set)."""
    info = read_image_set_info(store, key)
    labels, names = list(info["labels"]), list(info["class_names"])
    picks = [(c, pick_images(labels, c, max_per_class)) for c in pick_classes(labels, max_classes)]
    grid = _grid(store, key, info, picks)
    if with_parent and is_refined(info):
        pkey = str(info["parent"])
        pinfo = read_image_set_info(store, pkey)
        if list(pinfo["labels"]) != labels or list(pinfo["class_names"]) != names:
            raise DataError(f"image set {key} says it refines {pkey}, but their labels or class names "
                            "differ: the before / after images would not be the same images")
        grid.parent = _grid(store, pkey, pinfo, picks)
    return grid


def _grid(store, key: str, info: dict, picks: list[tuple[int, list[int]]]) -> ImageGrid:
    flat = read_images(store, key, [i for _, idx in picks for i in idx])
    rows, at = [], 0
    for c, idx in picks:
        rows.append(GridRow(c, str(info["class_names"][c]), idx, flat[at:at + len(idx)]))
        at += len(idx)
    return ImageGrid(key, str(info.get("image_source", "rded")), int(info["num_images"]),
                     len(info["class_names"]), rows)


# ---------------------------------------------------------------- drawing

def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def cell_size(h: int, w: int) -> tuple[int, int, int]:
    """(cell height, cell width, whole upscale factor; 0 when the images shrink)."""
    if max(h, w) > MAX_CELL:
        s = MAX_CELL / max(h, w)
        return max(1, round(h * s)), max(1, round(w * s)), 0
    f = max(1, -(-MIN_CELL // max(h, w)))
    return h * f, w * f, f


def thumbnail(img: np.ndarray, cell: tuple[int, int, int]) -> np.ndarray:
    """An image at its cell's size: a whole factor up (nearest: the pixels stay exact) or down (Lanczos)."""
    ch, cw, f = cell
    if f:
        return np.repeat(np.repeat(img, f, axis=0), f, axis=1)
    return np.asarray(Image.fromarray(img).resize((cw, ch), Image.LANCZOS))


def _label(row: GridRow) -> str:
    name = row.name if len(row.name) <= NAME_CHARS else row.name[:NAME_CHARS - 3] + "..."
    return f"{name} ({row.label})"


def _render(panels: list[tuple[str, ImageGrid]], title: str, per_class: int) -> bytes:
    """Panels side by side, one row per class (the rows of the first panel name them)."""
    rows0 = panels[0][1].rows
    shapes = {im.shape for _, g in panels for r in g.rows for im in r.images}
    if len(shapes) > 1:
        raise DataError(f"image grid {panels[0][1].key}: images of different shapes {sorted(shapes)}")
    if not shapes:
        raise DataError(f"image grid {panels[0][1].key}: the set has no images to show")
    h, w, _ = shapes.pop()
    cell = cell_size(h, w)
    ch, cw, _ = cell
    cols = min(per_class, max(len(r.indices) for r in rows0))
    font, small = _font(13), _font(11)
    label_w = PAD + max(int(small.getlength(_label(r))) for r in rows0) + PAD
    title_h, header_h = 20, 16 if len(panels) > 1 else 0
    # a panel is as wide as its header, so a narrow one (few images) does not run into the next
    panel_w = max([cols * (cw + GAP) - GAP] + [int(small.getlength(hd)) + PAD for hd, _ in panels if hd])
    width = PAD + label_w + len(panels) * (panel_w + PANEL_GAP) - PANEL_GAP + PAD
    height = PAD + title_h + header_h + len(rows0) * (ch + GAP) - GAP + PAD
    width = max(width, PAD + int(font.getlength(title)) + PAD)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill="black", font=font)
    x0, y0 = PAD + label_w, PAD + title_h + header_h
    for p, (header, g) in enumerate(panels):
        px = x0 + p * (panel_w + PANEL_GAP)
        if header:
            draw.text((px, PAD + title_h), header, fill="dimgray", font=small)
        for r, row in enumerate(g.rows):
            for j, im in enumerate(row.images[:cols]):
                canvas.paste(Image.fromarray(thumbnail(im, cell)), (px + j * (cw + GAP), y0 + r * (ch + GAP)))
    for r, row in enumerate(rows0):
        draw.text((PAD, y0 + r * (ch + GAP) + ch // 2), _label(row), fill="black", font=small, anchor="lm")
    layout = {"origin": [x0, y0], "cell": [ch, cw], "step": [ch + GAP, cw + GAP], "panel_step": panel_w + PANEL_GAP,
              "upscale": cell[2], "cols": cols,
              "panels": [{"header": hd, "key": g.key} for hd, g in panels],
              "rows": [{"label": row.label, "name": row.name, "images": row.indices[:cols]} for row in rows0]}
    info = PngInfo()
    info.add_text(GRID_META, json.dumps(layout))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def render_grid(grid: ImageGrid, per_class: int = MAX_PER_CLASS) -> bytes:
    """The grid as PNG bytes: rows = classes, columns = the class's images."""
    title = f"{grid.source} distilled images ({grid.key}): {len(grid.rows)} of {grid.num_classes} classes"
    return _render([("", grid)], title, per_class)


def render_before_after(grid: ImageGrid, per_class: int = BEFORE_AFTER_PER_CLASS) -> bytes:
    """The refined set's images beside the same images before refine (its parent), as PNG bytes."""
    if grid.parent is None:
        raise ValueError(f"image grid {grid.key}: no parent set (not a refined set, or read without it)")
    return _render([(f"before refine ({grid.parent.key})", grid.parent), (f"after refine ({grid.key})", grid)],
                   f"{grid.source} images before / after refine", per_class)


def grid_layout(png: bytes) -> dict:
    """The layout a rendered grid records in its PNG (``GRID_META``)."""
    img = Image.open(io.BytesIO(png))
    return json.loads(img.text[GRID_META])


def grid_caption(grid: ImageGrid, per_class: int = MAX_PER_CLASS) -> str:
    """What the grid shows, in words: source, artifact, which classes (by name) and how many images."""
    shown = len(grid.rows)
    which = (f"all {shown} classes" if shown == grid.num_classes else
             f"{shown} of the {grid.num_classes} classes, picked evenly over the label range")
    names = ", ".join(f"{r.label} {r.name}" for r in grid.rows)
    return (f"Distilled images (source: {grid.source}; artifact `{grid.key}`, {grid.num_images} images of "
            f"{grid.num_classes} classes). One row per class, {which}; each row is the class's first "
            f"images in set order (at most {per_class}). Rows: {names}.")
