"""Stored labels (SRe2L/FKD replay, LPLD's pruned pool): the relabel plan, the relabel pass, the
stored format under ``labels/<name>/``, replay, pruning."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from hello_ray.store import ArtifactNotFound
from hello_ray.views import View, draw_epoch

from hello_ray.label_spec import parse_strategy  # noqa: F401 (its old home)
from hello_ray.labels.online import (
    ClassCountMismatch,
    LABELS_DIR,
    LabelContext,
    LabelError,
    LabelStrategy,
)

# ----------------------------------------------------------------------------- stored

def stored_name(prune: int, images: str = "distilled", seed: int | None = None, topk: int = 0) -> str:
    """'stored', 'stored-N' or 'stored[-N]-topK' (``floor-stored[-N]`` for the random real images of
    the control rows): the folder name under ``labels/`` (no '/' inside a file name). ``seed``: the
    labels of that student seed's own views (``-seedS``; ``evaluate.stored_views=per_seed``, seeds
    after the first), None: the set that ships (the first seed's)."""
    name = "stored" if prune <= 1 else f"stored-{prune}"
    name = name if topk <= 0 else f"{name}-top{topk}"
    name = name if images == "distilled" else f"{images}-{name}"
    return name if seed is None else f"{name}-seed{seed}"


def meta_file(name: str) -> str:
    """The path of a stored-labels folder's ``meta.json`` (``name``: :func:`stored_name`), in its
    artifact: the file a finished relabel writes last and every reader opens first."""
    return f"{LABELS_DIR}/{name}/meta.json"


PRUNE_POOLS = ("lpld", "random")


def lpld_pool_size(total_batches: int, prune: int) -> int:
    """Label batches LPLD keeps for ``stored/N``: floor(T / N), at least one.

    LPLD (he-y/soft-label-pruning-for-dataset-distillation at 63eee18,
    ``relabel_and_validate/train_FKD_label_pruning_batch.py`` l. 442-445) computes
    ``int((1 - r) * T)`` with r = 1 - 1/N in floating point, which can land one below T/N
    (e.g. r = 0.9, T = 1000 -> 99); we keep the exact floor(T / N) the method describes.
    """
    return max(1, total_batches // prune)


@dataclass
class RelabelPlan:
    """Everything that fixes the views of a relabel pass; replay needs exactly the same."""
    epochs: int
    batch_size: int
    image_size: int
    cutmix_alpha: float
    seed: int
    prune: int = 1                 # keep 1/prune of the label batches (LPLD); 1 = keep all
    pool: str = "lpld"             # which batches: lpld (the first floor(T/N)) | random (a seeded draw)

    def views(self, images: torch.Tensor) -> Iterator[tuple[int, int, View]]:
        """(epoch, batch, view) for every label batch, in training order, drawn but not built: the
        same sequence a student of seed ``seed`` trains on (``views.draw_epoch``)."""
        g = torch.Generator().manual_seed(self.seed)
        n, h, w = len(images), images.shape[-2], images.shape[-1]
        for epoch in range(self.epochs):
            for b, view in enumerate(draw_epoch(n, h, w, self.batch_size, self.image_size, self.cutmix_alpha, g)):
                yield epoch, b, view

    def kept(self, n_images: int) -> list[tuple[int, int]]:
        """The (epoch, batch) label batches kept, in (epoch, batch) order: all (prune 1); LPLD's pool,
        the first floor(T / prune) of the T batches (``pool="lpld"``); or a seeded draw of
        ceil(T / prune) batches anywhere (``pool="random"``, our earlier rule)."""
        per_epoch = math.ceil(n_images / self.batch_size)
        every = [(e, b) for e in range(self.epochs) for b in range(per_epoch)]
        if self.prune <= 1:
            return every
        if self.pool == "lpld":
            return every[:lpld_pool_size(len(every), self.prune)]
        if self.pool != "random":
            raise ValueError(f"stored label pool {self.pool!r}: use one of {PRUNE_POOLS}")
        n_keep = max(1, math.ceil(len(every) / self.prune))
        rng = np.random.default_rng([self.seed, self.prune])
        picked = sorted(rng.choice(len(every), size=n_keep, replace=False).tolist())
        return [every[i] for i in picked]


#: Stored-label file layout written now: one array per field for the whole epoch file (batches
#: concatenated, ``nviews`` giving each batch's length). Files of layout 1 (eight arrays per batch,
#: ``b{b:05d}_<field>``) are still read. Each array in an .npz costs ~200 bytes of headers, so at the
#: demo's 10 classes and 25-view batches layout 1 spent more on headers than on logits.
PACK_LAYOUT = 2


def _pack(epoch_views: list[tuple[int, View]]) -> bytes:
    """One epoch file: for each batch its id, length, CutMix lambda and box; for every view its image
    id, crop box, flip, CutMix partner (within its batch) and either its fp16 logits [C] or, for
    top-k views, ``topv`` fp16 [k] and ``topi`` [k] class ids (int16 while C <= 32768, as LPQLD
    writes them; int32 beyond)."""
    views = [v for _, v in epoch_views]
    top = views[0].classes is not None
    boxes = torch.cat([v.boxes for v in views]).numpy()
    arrays: dict[str, np.ndarray] = {
        "layout": np.asarray([PACK_LAYOUT], dtype=np.int8),
        "batch": np.asarray([b for b, _ in epoch_views], dtype=np.int32),
        "nviews": np.asarray([len(v.index) for v in views], dtype=np.int32),
        "lam": np.asarray([v.lam for v in views], dtype=np.float32),
        "box": np.stack([v.box.numpy() for v in views]).astype(np.int32),                 # [batches, 4]
        "index": torch.cat([v.index for v in views]).numpy().astype(np.int32),            # [views]
        "boxes": boxes.astype(np.int16 if boxes.max() < 32768 else np.int32),             # [views, 4]
        "flips": torch.cat([v.flips for v in views]).numpy().astype(np.bool_),
        "perm": torch.cat([v.perm for v in views]).numpy().astype(np.int32),
    }
    if top:
        ids = torch.cat([v.classes for v in views])
        arrays["topv"] = torch.cat([v.logits for v in views]).numpy().astype(np.float16)   # [views, k]
        arrays["topi"] = ids.numpy().astype(np.int16 if int(ids.max()) < 32768 else np.int32)
    else:
        arrays["logits"] = torch.cat([v.logits for v in views]).numpy().astype(np.float16)  # [views, C]
    buf = io.BytesIO()
    np.savez(buf, **arrays)                                          # uncompressed: bytes are predictable
    return buf.getvalue()


def _unpack(data: bytes, where: str) -> dict[int, View]:
    try:
        z = np.load(io.BytesIO(data))
    except (ValueError, OSError) as e:
        raise LabelError(f"{where}: not a stored-label file ({e})") from None
    if "layout" not in z.files:
        return _unpack_per_batch(z)
    out: dict[int, View] = {}
    top = "topv" in z.files
    values = z["topv" if top else "logits"]
    at = 0
    for i, (b, n) in enumerate(zip(z["batch"].tolist(), z["nviews"].tolist())):
        sl = slice(at, at + n)
        at += n
        out[int(b)] = View(index=torch.from_numpy(z["index"][sl].astype(np.int64)),
                           boxes=torch.from_numpy(z["boxes"][sl].astype(np.int64)),
                           flips=torch.from_numpy(z["flips"][sl].copy()),
                           perm=torch.from_numpy(z["perm"][sl].astype(np.int64)),
                           lam=float(z["lam"][i]), box=torch.from_numpy(z["box"][i].astype(np.int64)),
                           logits=torch.from_numpy(values[sl].copy()),
                           classes=torch.from_numpy(z["topi"][sl].astype(np.int64)) if top else None)
    return out


def _unpack_per_batch(z) -> dict[int, View]:
    """Layout 1: eight arrays per batch, ``b{b:05d}_<field>``."""
    out: dict[int, View] = {}
    for b in sorted({int(k[1:6]) for k in z.files}):
        p = f"b{b:05d}_"
        out[b] = View(index=torch.from_numpy(z[p + "index"].astype(np.int64)),
                      boxes=torch.from_numpy(z[p + "boxes"].astype(np.int64)),
                      flips=torch.from_numpy(z[p + "flips"]),
                      perm=torch.from_numpy(z[p + "perm"].astype(np.int64)),
                      lam=float(z[p + "lam"][0]),
                      box=torch.from_numpy(z[p + "box"].astype(np.int64)),
                      logits=torch.from_numpy(z[p + "logits"]))
    return out


def top_k_view(view: View, k: int) -> View:
    """LPQLD's top-k of one stored view (he-y/soft-label-pruning-quantization-for-dataset-distillation
    at 107c7a5, ``relabel_and_validate/generate_soft_label_pruning_batch.py`` l. 393-447): the k
    largest pre-softmax logits of each row (no temperature: it is applied at replay) and their
    class ids. Ties keep torch.topk's order. The augmentation parameters are the view's own."""
    import dataclasses

    if view.classes is not None:
        raise LabelError("top-k of top-k labels: take the top-k of the full stored logits")
    k = min(k, view.logits.shape[1])
    vals, idx = torch.topk(view.logits.float(), k, dim=1)           # [B, k], [B, k]
    return dataclasses.replace(view, logits=vals.to(torch.float16), classes=idx)


def replay_top_k(values: torch.Tensor, classes: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """LPQLD's replay (``relabel_and_validate/train_FKD_LPQLD.py`` l. 723-764 at 107c7a5, the ``MR``
    labels): softmax over the k stored logits at ``temperature``, scattered into zeros of C classes;
    the other classes stay exactly 0 and nothing is renormalised. values [N, k], classes [N, k] ->
    probabilities [N, C] (float32)."""
    p = torch.softmax(values.float() / temperature, dim=1)             # [N, k]
    out = torch.zeros(values.shape[0], num_classes, dtype=torch.float32, device=values.device)
    return out.scatter_(1, classes.to(values.device).long(), p)


def relabel(labeller: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, plan: RelabelPlan, store,
            key: str, epochs: Iterator[int] | None = None, image_set: str = "distilled",
            seed: int | None = None) -> dict[str, int]:
    """FKD/SRe2L relabel pass: label every kept view once and write it to the store.

    images [M, 3, H, W] (uint8, or float in [0, 1]) on the labeller's device. Writes one
    ``labels/<name>/epoch_{e:04d}.npz`` per epoch that keeps at least one batch, holding per batch
    its image ids, crop boxes, flips, CutMix perm/lambda/box and fp16 logits. ``epochs`` limits the
    work to some epochs (ranks of a Ray Train group split them); the caller writes ``meta.json``
    with ``write_stored_meta`` once all epochs are in. ``seed``: write to that seed's own folder
    (:func:`stored_name`). Returns {file name: bytes written}.
    """
    name = stored_name(plan.prune, image_set, seed)
    keep = set(plan.kept(len(images)))
    wanted = set(range(plan.epochs) if epochs is None else epochs)
    written: dict[str, int] = {}
    current: list[tuple[int, View]] = []
    last_epoch = -1

    def flush(e: int) -> None:
        if current:
            fname = f"{LABELS_DIR}/{name}/epoch_{e:04d}.npz"
            data = _pack(current)
            store.put_bytes(key, fname, data)
            written[fname] = len(data)
            current.clear()

    last_kept = max(e for e, _ in keep)
    for epoch, b, view in plan.views(images):
        if epoch != last_epoch:
            flush(last_epoch)
            last_epoch = epoch
        if epoch > last_kept:  # LPLD's pool is a prefix: nothing after its last epoch is labelled
            break
        # The generator is walked through every batch (so kept views match the unpruned run's),
        # but pixels are built, on the images' device, only for kept batches of this caller's epochs.
        if epoch in wanted and (epoch, b) in keep:
            view.logits = labeller(view.materialise(images, plan.image_size)).to(torch.float16).cpu()
            current.append((b, view))
    flush(last_epoch)
    return written


def write_stored_meta(store, key: str, plan: RelabelPlan, n_images: int, num_classes: int,
                      files: dict[str, int], image_set: str = "distilled", seed: int | None = None,
                      topk: int = 0) -> int:
    """Write ``labels/<name>/meta.json`` last (the plan, the kept batches, each file's size; ``topk``
    when the views keep only their k largest logits).

    Returns the total shipped bytes: the epoch files plus meta.json itself.
    """
    name = stored_name(plan.prune, image_set, seed, topk)
    meta = {"plan": plan.__dict__, "n_images": n_images, "num_classes": num_classes,
            "kept": plan.kept(n_images), "files": dict(sorted(files.items()))}
    if topk:
        meta["topk"] = topk
    data = json.dumps(meta, indent=1).encode()
    store.put_bytes(key, meta_file(name), data)
    return sum(files.values()) + len(data)


class StoredLabels(LabelStrategy):
    """Replays the views and fp16 logits of a relabel pass (FKD / SRe2L; with prune N, LPLD).

    Unpruned: epoch e replays exactly the batches labelled for epoch e. Pruned (LPLD,
    he-y/soft-label-pruning-for-dataset-distillation at 63eee18,
    ``relabel_and_validate/train_FKD_label_pruning_batch.py`` l. 426-485, ``random`` metric with
    ``batch_to_epoch`` granularity): the kept batches form a pool and every epoch draws as many
    batches as an unpruned epoch has from it, uniformly with replacement; with ``pool="lpld"`` a
    draw that is the last batch of its epoch (the partial one) is replaced by its predecessor, as
    LPLD does. Draws are seeded by the student seed and the epoch (LPLD's global RNG is unseeded).
    """

    replays = True

    def __init__(self, store, key: str, prune: int = 1, image_set: str = "distilled", seed: int | None = None,
                 topk: int = 0):
        self.store, self.key, self.prune, self.topk = store, key, prune, topk
        self.name = ("stored" if prune <= 1 else f"stored/{prune}") + (f"@top{topk}" if topk else "")
        # Top-k views replay LPQLD's rule: probabilities at the epoch's temperature, not logits.
        self.distribution = topk > 0
        name = stored_name(prune, image_set, seed, topk)
        self.folder = f"{LABELS_DIR}/{name}"
        try:
            meta_bytes = store.get_bytes(key, meta_file(name))
        except ArtifactNotFound as e:  # a damaged file (IntegrityError) is not "missing": it propagates
            raise LabelError(f"artifact {key}: no stored labels at {meta_file(name)} "
                                     f"(run the relabel pass first): {e}") from None
        self.meta = json.loads(meta_bytes)
        self.plan = RelabelPlan(**self.meta["plan"])
        self.num_classes = int(self.meta["num_classes"])
        self._bytes = sum(self.meta["files"].values()) + len(meta_bytes)
        self._cache: dict[int, dict[int, View]] = {}
        self._pool: list[View] | None = None

    def _epoch(self, e: int) -> dict[int, View]:
        if e not in self._cache:
            fname = f"{self.folder}/epoch_{e:04d}.npz"
            if fname not in self.meta["files"]:
                return {}
            self._cache = {e: _unpack(self.store.get_bytes(self.key, fname), f"{self.key}/{fname}")}
        return self._cache[e]

    def pool(self) -> list[View]:
        """All kept label batches (loaded once; 1/prune of the full set)."""
        if self._pool is None:
            self._pool = []
            for e in sorted({e for e, _ in self.meta["kept"]}):
                fname = f"{self.folder}/epoch_{e:04d}.npz"
                self._pool += list(_unpack(self.store.get_bytes(self.key, fname), fname).values())
        return self._pool

    def epoch_views(self, epoch: int, seed: int) -> list[View]:
        """The views a student trains on in ``epoch`` (epochs beyond the plan wrap around)."""
        if self.prune <= 1:
            views = self._epoch(epoch % self.plan.epochs)
            return [views[b] for b in sorted(views)]
        return [self.pool()[i] for i in self.epoch_draw(epoch, seed)]

    def epoch_draw(self, epoch: int, seed: int) -> list[int]:
        """Pool indices (= global batch indices e * B + b for LPLD's prefix pool) of ``epoch``."""
        per_epoch = math.ceil(self.meta["n_images"] / self.plan.batch_size)
        n_pool = len(self.meta["kept"])
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        draw = torch.randint(n_pool, (per_epoch,), generator=g).tolist()
        if self.plan.pool == "lpld" and per_epoch > 1:
            draw = [i - 1 if (i + 1) % per_epoch == 0 else i for i in draw]
        return draw

    def label(self, images: torch.Tensor, context: LabelContext) -> torch.Tensor:
        if context.stored_logits is None:
            raise ValueError(f"{self.name}: stored labels only label the views they stored "
                             "(take the views from epoch_views)")
        if self.topk:
            if context.stored_classes is None:
                raise LabelError(f"{self.name}: the replayed views carry no top-k class ids")
            return replay_top_k(context.stored_logits.to(images.device), context.stored_classes,
                                context.num_classes, context.temperature)       # [N, C] probabilities
        return context.stored_logits.to(images.device, torch.float32)

    def shipped_bytes(self) -> int:
        return self._bytes


def check_classes(found: int, expected: int, what: str) -> None:
    """Fail before training when an input's class count differs from the dataset's."""
    if found != expected:
        raise ClassCountMismatch(f"{what} has {found} classes but the dataset has {expected}; "
                                 "use artifacts built from the same dataset")


def prune_stored(store, src_key: str, dst_key: str, prune: int, pool: str = "lpld",
                 image_set: str = "distilled", seed: int | None = None, src_image_set: str = "distilled",
                 src_seed: int | None = None) -> int:
    """``stored/N`` from unpruned labels: the kept batches of ``src_key``'s unpruned stored labels
    (``RelabelPlan.kept`` with ``prune``/``pool``) copied into ``labels/<stored-N>/`` of ``dst_key``
    (``image_set`` / ``seed`` name the folder, :func:`stored_name`), so their bytes are real files and
    ``StoredLabels(dst_key, prune)`` replays them as it replays labels relabelled pruned. The source
    is an imported ``labels-*`` artifact, or the evaluate artifact's own unpruned labels of the same
    views (``src_image_set`` / ``src_seed``): the very views and logits a pruned relabel would make,
    without labelling them again. Returns the shipped bytes."""
    import dataclasses

    full = StoredLabels(store, src_key, 1, src_image_set, src_seed)
    plan = dataclasses.replace(full.plan, prune=prune, pool=pool)
    n_images = int(full.meta["n_images"])
    by_epoch: dict[int, list[int]] = {}
    for e, b in plan.kept(n_images):
        by_epoch.setdefault(e, []).append(b)
    name = stored_name(prune, image_set, seed)
    files: dict[str, int] = {}
    for e, batches in sorted(by_epoch.items()):
        views = full._epoch(e)
        missing = [b for b in batches if b not in views]
        if missing:
            raise LabelError(f"artifact {src_key}: epoch {e} has no stored batch {missing[0]}")
        data = _pack([(b, views[b]) for b in batches])
        fname = f"{LABELS_DIR}/{name}/epoch_{e:04d}.npz"
        store.put_bytes(dst_key, fname, data)
        files[fname] = len(data)
    return write_stored_meta(store, dst_key, plan, n_images, full.num_classes, files, image_set, seed)


def top_k_stored(store, src: StoredLabels, dst_key: str, topk: int, image_set: str = "distilled",
                 seed: int | None = None) -> int:
    """``stored[/N]@topK`` from the full-logit labels ``src`` (same views, same pool): every kept view
    re-written with only its k largest logits and their class ids (:func:`top_k_view`), in
    ``labels/<stored[-N]-topK>/`` of ``dst_key``, so the bytes are real files of LPQLD's layout.
    LPQLD quantises while relabelling; taking the top-k of fp16 logits already stored gives the
    same views and the same k logits (fp16 rounding can only reorder exact ties). Returns the
    shipped bytes."""
    if topk < 1:
        raise LabelError(f"top-k stored labels need k >= 1, got {topk}")
    n_images = int(src.meta["n_images"])
    files: dict[str, int] = {}
    name = stored_name(src.prune, image_set, seed, topk)
    for e in sorted({int(e) for e, _ in src.meta["kept"]}):
        fname = f"{src.folder}/epoch_{e:04d}.npz"
        views = _unpack(src.store.get_bytes(src.key, fname), f"{src.key}/{fname}")
        data = _pack([(b, top_k_view(v, topk)) for b, v in sorted(views.items())])
        out = f"{LABELS_DIR}/{name}/epoch_{e:04d}.npz"
        store.put_bytes(dst_key, out, data)
        files[out] = len(data)
    return write_stored_meta(store, dst_key, src.plan, n_images, src.num_classes, files, image_set, seed, topk)
