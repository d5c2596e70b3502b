"""Fake inputs the tests build on disk, written once here rather than in each test file."""
from __future__ import annotations

import io
import json
import socket
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" = every interface: what a Ray node binds)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


DEMO_KEYS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pixels(c: int, i: int, size: int) -> np.ndarray:
    """Image ``i`` of class ``c``: seeded noise, (size, size, 3) uint8."""
    return np.random.default_rng([c, i]).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_external_set(root: Path, layout: str, ipc: int = 2, size: int = 24,
                       names: list[str] | None = None) -> Path:
    """A 10-class distilled set on disk as each reference writes it (PNG for 'folders', JPEG otherwise):
    RDED's ``<c:05d>/class<c:05d>_id<i:05d>.jpg``, SRe2L's ``new<c:03d>/class<c:03d>_id<i:03d>.jpg``."""
    for c in range(10):
        folder = {"rded": f"{c:05d}", "sre2l": f"new{c:03d}", "folders": (names or DEMO_KEYS)[c]}[layout]
        (root / folder).mkdir(parents=True)
        for i in range(ipc):
            name = {"rded": f"class{c:05d}_id{i:05d}.jpg", "sre2l": f"class{c:03d}_id{i:03d}.jpg",
                    "folders": f"img{i}.png"}[layout]
            Image.fromarray(pixels(c, i, size)).save(root / folder / name)
    return root


def write_teachers(store, model: str, class_names: list[str], size: int, seeds: list[int] | tuple[int, ...],
                   key: str | None = None, config: dict | None = None, epoch_fields: dict | None = None,
                   planted: bytes | None = None) -> str:
    """A finished teachers artifact in the documented format (hello_ray/formats/trajectory.py): epoch
    ``e`` holds the zoo ``model`` built after ``torch.manual_seed(seeds[e - 1])``, then trajectory.json
    and the manifest. ``key``: default, derived from ``config`` and the classes. ``epoch_fields``:
    added to every epoch's row (top1 0.0 unless given). ``planted``: epoch 1's file instead of its
    checkpoint (the manifest matches it). Returns the key."""
    import io

    import torch

    from hello_ray.formats.trajectory import epoch_file, write_trajectory
    from hello_ray.models.zoo import build_model

    config = config or {}
    key = key or store.artifact_key("teachers", {**config, "classes": list(class_names)})
    rows = []
    for e, seed in enumerate(seeds, start=1):
        torch.manual_seed(seed)
        buf = io.BytesIO()
        torch.save(build_model(model, len(class_names), size).state_dict(), buf)
        store.put_bytes(key, epoch_file(e), planted if planted is not None and e == 1 else buf.getvalue())
        rows.append({"epoch": e, "top1": 0.0, "file": epoch_file(e), **(epoch_fields or {})})
    write_trajectory(store, key, {"model": model, "num_classes": len(class_names), "image_size": size,
                                  "class_names": list(class_names), "epochs": rows})
    store.finalize(key, "teachers", config, {}, {})
    return key


# ---------------------------------------------------------------------------- datasets

# The source tests' classes: a plain name, a WordNet id, a name with an underscore.
CLASSES = ["apple_pie", "n01440764", "zebra"]


def encoded_image(rng: np.random.Generator, fmt: str) -> bytes:
    """A random image of 10-19 px a side, encoded as ``fmt`` (PNG, JPEG)."""
    h, w = int(rng.integers(10, 20)), int(rng.integers(10, 20))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_samples(seed: int = 0, per_class: int = 4) -> list[tuple[int, str, bytes]]:
    """(label, file name, encoded bytes): alternating PNG and JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(CLASSES)):
        for i in range(per_class):
            fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
            out.append((c, f"img{i:02d}.{ext}", encoded_image(rng, fmt)))
    return out


def write_parquet(root: Path, split: str, samples, shards: int = 2, classes=CLASSES,
                  hf_struct: bool = True) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(samples)), shards)):
        rows = [samples[i] for i in part]
        blobs = pa.array([r[2] for r in rows], pa.binary())
        image = (pa.StructArray.from_arrays([blobs, pa.array([r[1] for r in rows])], ["bytes", "path"])
                 if hf_struct else blobs)
        path = root / f"{split}-{s:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.table({"image": image, "label": pa.array([r[0] for r in rows], pa.int64())}),
                       path, row_group_size=3)
        paths.append(path)
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(list(classes)))
    return paths


def upload(local: Path, s3_uri: str) -> str:
    """Copy the local folder ``local`` to ``s3_uri`` through the store's pyarrow filesystem."""
    from hello_ray.store import resolve_filesystem

    fs, path = resolve_filesystem(s3_uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return s3_uri


def write_image_folder(root, classes: dict[str, list[str]], size: int | tuple[int, int] = 32, seed: int = 0):
    """An ImageFolder train split: class -> file names; names containing 'bad' get garbage bytes.
    ``size``: a side, or (height, width) of every image."""
    h, w = (size, size) if isinstance(size, int) else size
    from hello_ray.data.images import encode_png

    rng = np.random.default_rng(seed)
    for c, (name, files) in enumerate(classes.items()):
        d = root / "train" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            if "bad" in f:
                (d / f).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
                continue
            tint = np.zeros(3)
            tint[c % 3] = 180
            img = (tint + rng.integers(0, 75, size=(h, w, 3))).astype(np.uint8)
            (d / f).write_bytes(encode_png(img))
    return root


def write_adapter(store, key: str, class_names: list[str]) -> None:
    """A finished transfer artifact: the tiny random-init projector with a rank-2/4 LoRA, fp16."""
    from hello_ray.models.projector import Projector

    proj = Projector.from_clip("hello-tiny-rn", "random-init", class_names).add_lora(2, 4)
    with tempfile.TemporaryDirectory() as d:
        proj.save_adapter(d, dtype="fp16")
        store.put_dir(key, d)
    store.finalize(key, "transfer", {}, {})


def write_observer(store, class_names: list[str], size: int = 32) -> str:
    """A finished teachers artifact holding one small observer (a seeded ShuffleNet V2 x0.5)."""
    return write_teachers(store, "shufflenet_v2_x0_5", class_names, size, (0,), config={"test": "select"})


def write_sre2l_records(root: Path, n: int, bs: int, epochs: int, classes: int, seed: int = 42,
                        size: int = 32) -> list:
    """Records exactly as SRe2L's generate_soft_label.py saves them: numpy lambda and box."""
    import torch

    from hello_ray.formats.fkd import sre2l_batches

    rng = np.random.default_rng(0)
    saved = []
    for e in range(epochs):
        (root / f"epoch_{e}").mkdir(parents=True)
        for b, idx in enumerate(sre2l_batches(n, bs, epochs, seed)[e]):
            k = len(idx)
            i, j = rng.integers(0, 8, k), rng.integers(0, 8, k)
            coords = torch.tensor(np.stack([i / size, j / size, (size - i) / size, (size - j) / size], 1),
                                  dtype=torch.float32)
            lam = np.random.default_rng(b).beta(1.0, 1.0)
            bbox = [np.clip(np.int64(2), 0, size), np.int64(5), np.int64(10), np.clip(np.int64(12), 0, size)]
            rec = [coords, torch.tensor(rng.random(k) < 0.5), torch.randperm(k), lam, bbox,
                   torch.randn(k, classes).half()]
            torch.save(rec, root / f"epoch_{e}" / f"batch_{b}.tar")
            saved.append((e, b, idx, rec))
    return saved
