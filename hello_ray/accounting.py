"""Storage accounting: what each way of labelling a distilled set costs to ship.

``storage_report`` compares, for ``classes x ipc`` synthetic images trained ``epochs`` epochs:

- stored soft labels (SRe2L / FKD relabel): one fp16 logit vector per image per epoch,
  ``epochs x images x classes x 2`` bytes (METHOD.md; augmentation parameters not counted);
- the teacher's weights (the observer shipped instead, RDED-style);
- the HeLlO projector's LoRA tensors, counted by actually applying ``Projector.add_lora`` to
  the projector of the one factory, ``Projector.from_clip(..., pretrained="meta")``: the real
  CLIP architecture on PyTorch's meta device (real layer shapes, no weights allocated, read or
  downloaded, no prompts encoded), so ``hello-ray storage`` takes about a second.

CLI: ``hello-ray storage --classes 1000 --ipc 10 [--json]``.
"""
from __future__ import annotations

from typing import Any

import torch

from hello_ray.models.clip import META
from hello_ray.models.lora import LORA_STYLES
from hello_ray.models.projector import Projector, default_head_rank
from hello_ray.tables import human_bytes

MIB = 1024 ** 2
FP16_BYTES = 2


def stored_soft_label_bytes(classes: int, ipc: int, epochs: int) -> int:
    """fp16 logits, one augmented view per image per epoch (METHOD.md)."""
    return epochs * classes * ipc * classes * FP16_BYTES


def pool_views(classes: int, ipc: int, epochs: int, batch_size: int, prune: int) -> int:
    """Views in LPLD's pool for ``stored/prune``: the first floor(T / prune) label batches in (epoch,
    batch) order, each as many views as images in it (the epoch's last batch is partial)."""
    from hello_ray.labels import lpld_pool_size

    images = classes * ipc
    per_epoch = -(-images // batch_size)
    kept = lpld_pool_size(epochs * per_epoch, prune)
    full_epochs, rest = divmod(kept, per_epoch)
    # rest < per_epoch: a partial epoch holds only full batches (only an epoch's last one is short)
    return full_epochs * images + rest * batch_size


def pruned_label_bytes(classes: int, ipc: int, epochs: int, batch_size: int, prune: int) -> int:
    """fp16 logits of LPLD's pool for ``stored/prune`` (:func:`pool_views` x C x 2 bytes)."""
    return pool_views(classes, ipc, epochs, batch_size, prune) * classes * FP16_BYTES


def topk_label_bytes(classes: int, ipc: int, epochs: int, batch_size: int, prune: int, k: int) -> int:
    """``stored/prune@topk``: per view of the pool its k largest logits (fp16) and their class ids
    (int16 while C <= 32768, else int32), as ``labels/stored.py`` writes them and LPQLD stores them."""
    ids = 2 if classes <= 32768 else 4
    return pool_views(classes, ipc, epochs, batch_size, prune) * min(k, classes) * (FP16_BYTES + ids)


# he-y/soft-label-pruning-quantization-for-dataset-distillation @ 107c7a5, README.md (ImageNet-1K,
# IPC 10, ResNet-18, 300 epochs): label folder sizes in GB and student top-1 %, by (prune N, top-k).
LPQLD_PUBLISHED = {(1, 0): ("full", 5.67, 20.1), (10, 100): ("x40", 0.13, 29.6),
                   (10, 50): ("x80", 0.07, 27.3), (10, 10): ("x200", 0.03, 20.0)}


def teacher_params(teacher: str, classes: int, image_size: int) -> int:
    """Parameters of the zoo teacher (built on the meta device: shapes only)."""
    from hello_ray.models.zoo import build_model, count_params

    with torch.device("meta"):
        return count_params(build_model(teacher, classes, image_size))


def projector_lora_counts(classes: int, conv_rank: int, head_rank: int, clip_model: str = "RN50",
                          lora_style: str = "separable") -> dict[str, int]:
    """LoRA parameter/tensor counts of the projector for ``clip_model``, from its real layers.

    The projector comes from ``Projector.from_clip`` on the meta device (encoder of the real
    architecture, a head of the real [classes, embed_dim] shape) and ``add_lora`` is applied to
    it, so the count is exactly what knowledge transfer trains and the adapter ships.
    """
    projector = Projector.from_clip(clip_model, META, [f"class_{c}" for c in range(classes)])
    projector.add_lora(conv_rank, head_rank, style=lora_style)
    embed_dim = projector.head.in_features
    lora = projector.lora_state_dict()
    head = sum(t.numel() for k, t in lora.items() if k.startswith("head."))
    total = sum(t.numel() for t in lora.values())
    return {"params": total, "conv_params": total - head, "head_params": head, "tensors": len(lora),
            "embed_dim": embed_dim,
            "conv_layers": sum(1 for k in lora if k.startswith("encoder.") and ".lora_A." in k)}


def storage_report(classes: int, ipc: int, epochs: int = 300, conv_rank: int = 8,
                   head_rank: int | None = None, clip_model: str = "RN50", lora_style: str = "separable",
                   teacher: str = "resnet18", image_size: int = 224, batch_size: int = 100,
                   prunes: tuple[int, ...] = (10, 20, 40),
                   topks: tuple[tuple[int, int], ...] = ((10, 100), (10, 50), (10, 10))) -> dict[str, Any]:
    """Bytes of each label strategy for ``classes x ipc`` images trained ``epochs`` epochs."""
    for name, value in (("classes", classes), ("ipc", ipc), ("epochs", epochs), ("conv_rank", conv_rank)):
        if value < 1:
            raise ValueError(f"storage_report: {name} must be >= 1, got {value}")
    if lora_style not in LORA_STYLES:
        raise ValueError(f"storage_report: lora_style {lora_style!r} is not one of {', '.join(LORA_STYLES)}")
    head_rank = default_head_rank(classes) if head_rank is None else head_rank
    images = classes * ipc
    labels = stored_soft_label_bytes(classes, ipc, epochs)
    t_params = teacher_params(teacher, classes, image_size)
    lora = projector_lora_counts(classes, conv_rank, head_rank, clip_model, lora_style)
    n = lora["params"]
    return {
        "classes": classes,
        "ipc": ipc,
        "images": images,
        "epochs": epochs,
        "stored_soft_labels_bytes": labels,
        "stored_soft_labels_mib": labels / MIB,
        "label_batch_size": batch_size,
        # LPLD's pool for stored/N (hello_ray/labels/stored.py): {N: bytes}
        "stored_pruned_bytes": {str(n): pruned_label_bytes(classes, ipc, epochs, batch_size, n) for n in prunes},
        # LPQLD's top-k of those pools, {"N@topK": bytes} (k < classes only)
        "stored_topk_bytes": {f"{n}@top{k}": topk_label_bytes(classes, ipc, epochs, batch_size, n, k)
                              for n, k in topks if k < classes},
        "teacher": teacher,
        "teacher_image_size": image_size,
        "teacher_params": t_params,
        "teacher_bytes_fp32": t_params * 4,
        "teacher_bytes_fp16": t_params * 2,
        "clip_model": clip_model,
        "lora_style": lora_style,
        "conv_rank": conv_rank,
        "head_rank": head_rank,
        "projector_lora_params": n,
        "projector_lora_conv_params": lora["conv_params"],
        "projector_lora_head_params": lora["head_params"],
        "projector_lora_tensors": lora["tensors"],
        "projector_lora_conv_layers": lora["conv_layers"],
        "projector_lora_bytes_fp32": n * 4,
        "projector_lora_bytes_fp16": n * 2,
        # int8 adds one fp32 scale per tensor (hello_ray/models/adapter.py).
        "projector_lora_bytes_int8": n + 4 * lora["tensors"],
        "labels_over_projector_fp16": labels / (n * 2),
    }


def format_report(r: dict[str, Any]) -> str:
    """A readable table of a :func:`storage_report`."""
    rows = [
        ("stored soft labels (fp16, 1 view/img/epoch)", f"{r['epochs']} ep x {r['images']:,} img x "
         f"{r['classes']:,} cls", r["stored_soft_labels_bytes"]),
        *[(f"stored / {n} (LPLD pool, batch {r['label_batch_size']})", f"first 1/{n} of the label batches", b)
          for n, b in r.get("stored_pruned_bytes", {}).items()],
        *[(f"stored / {nk.replace('@', ' @ ')} (LPQLD)", "k fp16 logits + k int16 ids per view", b)
          for nk, b in r.get("stored_topk_bytes", {}).items()],
        (f"teacher {r['teacher']} weights (fp32)", f"{r['teacher_params']:,} params", r["teacher_bytes_fp32"]),
        (f"teacher {r['teacher']} weights (fp16)", f"{r['teacher_params']:,} params", r["teacher_bytes_fp16"]),
    ]
    lora = (f"{r['projector_lora_params']:,} params (conv {r['projector_lora_conv_params']:,} + "
            f"head {r['projector_lora_head_params']:,})")
    for dt in ("fp32", "fp16", "int8"):
        rows.append((f"HeLlO projector LoRA ({dt})", lora, r[f"projector_lora_bytes_{dt}"]))
    head = (f"label storage: {r['classes']:,} classes x IPC {r['ipc']} = {r['images']:,} images, "
            f"CLIP {r['clip_model']} LoRA {r['lora_style']} conv rank {r['conv_rank']}, "
            f"head rank {r['head_rank']}")
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    lines = [head, "-" * len(head)]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:>16,} B  {human_bytes(c, digits=1):>12}" for a, b, c in rows]
    lines.append(f"stored labels / projector LoRA (fp16): {r['labels_over_projector_fp16']:,.1f}x")
    if r["classes"] == 1000 and r["ipc"] == 10 and r["epochs"] == 300:
        lines += ["", "LPQLD's published label sizes at this shape (README @ 107c7a5; its batch 128, so its "
                  "pools differ slightly from batch " f"{r['label_batch_size']}):"]
        full = r["stored_soft_labels_bytes"]
        for (n, k), (tag, gb, top1) in LPQLD_PUBLISHED.items():
            ours = full if not k else r.get("stored_topk_bytes", {}).get(f"{n}@top{k}")
            what = "full labels" if not k else f"stored/{n}@top{k}"
            mine = "-" if ours is None else f"{ours / 1e9:.3f} GB ({full / ours:,.0f}x smaller)"
            lines.append(f"  {tag:>5}  {what:<18} published {gb:.2f} GB, top-1 {top1} %   here: {mine}")
    return "\n".join(lines)
