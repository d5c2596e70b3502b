"""Ray Data UDFs that turn encoded rows into fixed-size uint8 arrays.

Resize rule: shorter side to ``image_size`` then a centre crop (images.fit_square), so the
aspect ratio is kept and a square image of the right size passes through bit-exact. A training
pass may instead cut each image's RandomResizedCrop from the whole image (``DecodeCropBatch``).

Corrupt images: ``on_corrupt="fail"`` raises CorruptImageError naming the image id (path or
shard:row); ``"skip"`` drops the row and logs one warning line per image. To *collect* the
corrupt ids (for a report), use ``keep_corrupt=True`` (the row stays, with an all-zero image and
``ok=False``) or :func:`find_corrupt`, which runs that over a split and returns the ids.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from hello_ray import placement
from hello_ray.config import DataConfig
from hello_ray.data.errors import CorruptImageError, data_errors
from hello_ray.data.images import decode_random_crop, decode_resized

if TYPE_CHECKING:  # annotations only: importing ray here would slow every import of the module
    import ray

log = logging.getLogger(__name__)


class DecodeBatch:
    """``map_batches`` UDF (batch_format="numpy"):
    {"image": bytes [N], "label": int64 [N], "id": str [N]}
    -> {"image": uint8 [N, S, S, 3], "label": int64 [N], "id": str [N]} (+ "ok": bool [N], "reason")
    """

    def __init__(self, image_size: int, on_corrupt: str = "skip", keep_corrupt: bool = False):
        if on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
        self.size, self.on_corrupt, self.keep_corrupt = image_size, on_corrupt, keep_corrupt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        placement.record(placement.TASKS)  # once per process and stage
        n, s = len(batch["id"]), self.size
        out = np.zeros((n, s, s, 3), dtype=np.uint8)  # [N, S, S, 3]
        ok = np.ones(n, dtype=bool)
        reasons = np.full(n, "", dtype=object)
        decode = self._decoder()
        for i, (data, where) in enumerate(zip(batch["image"], batch["id"])):
            try:
                out[i] = decode(data, str(where))
            except CorruptImageError as e:
                if self.on_corrupt == "fail" and not self.keep_corrupt:
                    raise
                ok[i], reasons[i] = False, e.reason
                if not self.keep_corrupt:
                    log.warning("corrupt image skipped: %s (%s)", where, e.reason)
        result = {"image": out, "label": np.asarray(batch["label"], dtype=np.int64),
                  "id": np.asarray(batch["id"], dtype=object)}
        if self.keep_corrupt:
            return {**result, "ok": ok, "reason": reasons}
        return {k: v[ok] for k, v in result.items()}

    def _decoder(self) -> Callable[[bytes, str], np.ndarray]:
        """This batch's bytes -> [S, S, 3] rule: the centred square (``fit_square``)."""
        return lambda data, where: decode_resized(data, where, self.size)


class DecodeCropBatch(DecodeBatch):
    """``DecodeBatch`` for a training pass: each image's RandomResizedCrop drawn over the whole
    decoded image (``images.decode_random_crop``, torchvision's training recipe) -> uint8 [S, S, 3].

    ``seed=None`` draws each batch's boxes from fresh entropy: Ray Data runs this UDF anew at every
    pass, with no epoch number, so a fixed seed would give every epoch the same crops. (The pass's
    file order is unseeded too: ``sources.shuffled_files``.) A seed is for tests and replays.
    """

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 on_corrupt: str = "skip", seed: int | None = None):
        super().__init__(image_size, on_corrupt)
        self.scale, self.ratio, self.seed = tuple(scale), tuple(ratio), seed

    def _decoder(self) -> Callable[[bytes, str], np.ndarray]:
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed) if self.seed is not None else g.seed()
        return lambda data, where: decode_random_crop(data, where, self.size, self.scale, self.ratio, g)


def decoded_split(split, data: DataConfig, batch_size: int = 64, image_size: int | None = None,
                  columns: list[str] | None = None, train_crop: tuple[float, float] | None = None,
                  ) -> "ray.data.Dataset":
    """A DatasetSplit's rows decoded to uint8 [S, S, 3] images (S = data.image_size),
    skipping or failing on corrupt images as ``data.on_corrupt`` says; ``columns`` keeps only those.
    ``train_crop``: a RandomResizedCrop area range, drawn over each whole image as it is decoded
    (``DecodeCropBatch``); None: the centred square (``fit_square``).

    Every operator asks for ``data.cpus_per_task`` CPUs: operators with equal resource asks fuse
    into one task, and none asks for a whole CPU that fractional reservations may never free.
    """
    size = image_size or data.image_size
    udf = DecodeBatch(size, data.on_corrupt) if train_crop is None else \
        DecodeCropBatch(size, train_crop, on_corrupt=data.on_corrupt)
    ds = split.ds.map_batches(udf,
                              batch_size=batch_size, batch_format="numpy", num_cpus=data.cpus_per_task)
    return ds.select_columns(columns, num_cpus=data.cpus_per_task) if columns else ds


def _is_corrupt(row: dict) -> bool:
    return not row["ok"]


def find_corrupt(split, image_size: int = 8, num_cpus: float = 1.0) -> list[tuple[str, str]]:
    """(id, reason) of every undecodable image of a split, sorted by id (one full decode pass;
    the small ``image_size`` keeps the resize cheap)."""
    ds = split.ds.map_batches(DecodeBatch(image_size, "skip", keep_corrupt=True),
                              batch_format="numpy", num_cpus=num_cpus).filter(_is_corrupt,
                                                                              num_cpus=num_cpus)
    with data_errors():
        rows = ds.select_columns(["id", "reason"], num_cpus=num_cpus).take_all()
    found = sorted((str(r["id"]), str(r["reason"])) for r in rows)
    for where, reason in found:
        log.warning("corrupt image: %s (%s)", where, reason)
    if found:
        log.warning("%d corrupt image(s) in %s split %r", len(found), split.source, split.split)
    return found


def decode_on_worker(data: DataConfig, use_gpu: bool) -> bool:
    """Whether the Train workers decode their training batches (``data.decode``; auto: on GPUs)."""
    return data.decode == "worker" or (data.decode == "auto" and use_gpu)


def training_split(split, data: DataConfig, on_worker: bool, train_crop: tuple[float, float] | None,
                   batch_size: int = 64) -> "ray.data.Dataset":
    """A training stage's train split: decoded (and cropped, ``train_crop``) by CPU tasks, or left
    encoded for the workers to decode (``on_worker``: only the files are read)."""
    if on_worker:
        return split.ds.select_columns(["image", "label", "id"], num_cpus=data.cpus_per_task)
    return decoded_split(split, data, batch_size, columns=["image", "label"], train_crop=train_crop)


def worker_batches(shard, batch_size: int, device, size: int, train_crop: tuple[float, float] | None,
                   generator, on_corrupt: str, seed: int | None, drop_last: bool = True):
    """A Train worker's batches of encoded rows, decoded on its ``device`` (``device_decode``):
    {"image": uint8 [M, S, S, 3], "label": int64 [M]}, both on the device (M <= batch_size: corrupt
    images skipped). ``generator``: a CPU generator for the crop boxes."""
    import torch

    from hello_ray.data.device_decode import decode_batch

    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                    local_shuffle_buffer_size=max(4 * batch_size, 256), local_shuffle_seed=seed):
        images, kept = decode_batch(batch["image"], batch["id"], size, device, train_crop, generator, on_corrupt)
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64)[kept]).to(device)
        yield {"image": images, "label": labels}
