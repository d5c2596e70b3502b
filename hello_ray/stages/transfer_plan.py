"""How preflight checks, rehearses and prices stage ``transfer`` (see ``teachers_plan`` for the names).

- check: the CLIP model name, and whether its pretrained weights are here or downloadable from here
  (``report.facts["clip_weights"]``: what the rehearsal loads);
- rehearse: the projector at the real shapes (every class's head row; ``TEXT_CLASSES`` of them
  text-encoded, timed and extrapolated, the rest random unit rows: 1000 classes x 7 prompts through
  RN50's text tower is ~15 min of CPU that shape checking does not need), then
  ``transfer_core.transfer_step`` in the driver against the rehearsed teacher window; the adapter put
  through the store;
- work: train images x epochs views (projector forward + backward, teacher window forward), plus the
  text initialisation of every class's head row; the adapter written;
- gpu_hours: DDP at the profile's step, unchanged by the GPU work.
"""
from __future__ import annotations

import copy
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hello_ray.config import Config
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal, count_flops, gpu_hours_row, timed_steps

PROFILE_SECTIONS = ("transfer_step",)
TEXT_CLASSES = 4  # class rows of the projector head text-encoded in the rehearsal (timed per class)


def _cached_clip_weights(model: str, tag: str) -> tuple[str | None, str]:
    """(local cache path or None, where it would be downloaded from) for an open_clip tag."""
    from open_clip.pretrained import get_pretrained_cfg

    pcfg = get_pretrained_cfg(model, tag)
    hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if hub:
        repo, filename = os.path.split(hub)
        try:
            from huggingface_hub import try_to_load_from_cache
            for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
                hit = try_to_load_from_cache(repo, name)
                if isinstance(hit, str):
                    return hit, f"https://huggingface.co/{repo}"
        except ImportError:
            pass
    if url:
        path = Path("~/.cache/clip").expanduser() / posixpath.basename(url)
        if path.is_file():
            return str(path), url
    return None, f"https://huggingface.co/{hub.rstrip('/')}" if hub else url


def _reachable(url: str, timeout: float = 3.0) -> str:
    """'' when a HEAD request to ``url`` answers (any HTTP status), else the reason (nothing is downloaded)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return ""
    except urllib.error.HTTPError:
        return ""  # the host answered
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def check(cfg: Config, store: Any, report: Any, probe_network: bool = True) -> None:
    """The CLIP model name, and whether its pretrained weights are here or downloadable from here."""
    import open_clip

    from hello_ray.models.clip import META, RANDOM_INIT, register_tiny_clip

    tc = cfg.transfer
    register_tiny_clip()
    if tc.clip_model not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if tc.clip_model.lower()[:3] in m.lower()][:6]
        report.add("weights.clip", "fail", f"config key 'transfer.clip_model': unknown CLIP model {tc.clip_model!r}; "
                   f"open_clip knows e.g. {near or ['RN50', 'ViT-B-32']} (open_clip.list_models())")
        return
    report.facts["clip_weights"] = "random-init"
    if tc.pretrained == RANDOM_INIT:
        report.add("weights.clip", "ok", f"{tc.clip_model}: random-init stand-in (nothing to download)")
        return
    if tc.pretrained == META:
        report.add("weights.clip", "fail", "config key 'transfer.pretrained': 'meta' has no weights to train")
        return
    if os.path.isfile(tc.pretrained):
        report.facts["clip_weights"] = tc.pretrained
        report.add("weights.clip", "ok", f"{tc.clip_model}: local weights file {tc.pretrained}")
        return
    tags = [t.lower() for t in open_clip.list_pretrained_tags_by_model(tc.clip_model)]
    if tc.pretrained.lower() not in tags:
        report.add("weights.clip", "fail", f"config key 'transfer.pretrained': {tc.pretrained!r} is neither a local "
                   f"file nor a pretrained tag of {tc.clip_model} (tags: {tags})")
        return
    cached, source = _cached_clip_weights(tc.clip_model, tc.pretrained)
    if cached:
        report.facts["clip_weights"] = cached
        report.add("weights.clip", "ok", f"{tc.clip_model}/{tc.pretrained}: cached here at {cached}")
        return
    why = _reachable(source) if probe_network and source else "not probed"
    if not why:
        report.add("weights.clip", "ok", f"{tc.clip_model}/{tc.pretrained}: not cached; downloadable from {source} "
                   "(reachable from this machine; each node downloads it once)")
    else:
        report.add("weights.clip", "warn", f"{tc.clip_model}/{tc.pretrained}: not cached here and {source} is not "
                   f"reachable from this machine ({why}); the run's nodes must reach it or set "
                   "transfer.pretrained to a local file; the rehearsal uses random-init weights")


def _projector(r: Any) -> tuple[Any, list[str], float]:
    """The projector at the real shapes; (projector, notes, text-init seconds per class)."""
    from hello_ray.models.clip import RANDOM_INIT, clip_input_size, clip_normalisation, create_clip
    from hello_ray.models.projector import DEFAULT_TEMPLATES, Projector, text_head_weight

    tc = r.cfg.transfer
    notes = []
    tag = RANDOM_INIT if r.clip_weights == RANDOM_INIT else tc.pretrained
    if tag == RANDOM_INIT and tc.pretrained != RANDOM_INIT:
        notes.append(f"CLIP {tc.clip_model}: random-init weights (pretrained {tc.pretrained!r} not on this machine)")
    model, tokenizer = create_clip(tc.clip_model, tag)
    model = model.to(r.device)
    k = min(TEXT_CLASSES, r.C)
    with Clock() as c:
        rows = text_head_weight(model, tokenizer, r.names[:k], list(DEFAULT_TEMPLATES))   # [k, D]
    text_s = (c.cpu if r.device.type == "cpu" else c.wall) / k
    if k < r.C:
        notes.append(f"head: {k} of {r.C} rows text-encoded ({text_s:.2f} s/class, extrapolated), "
                     "the rest random unit rows")
        g = torch.Generator().manual_seed(0)
        rest = F.normalize(torch.randn(r.C - k, rows.shape[1], generator=g), dim=-1).to(rows)
        rows = torch.cat([rows, rest])                                              # [C, D]
    mean, std = clip_normalisation(model)
    proj = Projector(model.visual, rows, model.logit_scale, clip_input_size(model), mean, std,
                     tc.clip_model, tag, r.names, DEFAULT_TEMPLATES)
    proj.add_lora(tc.conv_rank, tc.head_rank, style=tc.lora_style, alpha_ratio=tc.lora_alpha_ratio)
    return proj, notes, text_s


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.data.augment import to_float
    from hello_ray.models.ensemble import TeacherEnsemble
    from hello_ray.stages.transfer_core import lora_parameters, transfer_step

    tc = r.cfg.transfer
    proj, notes, text_s = _projector(r)
    lora = proj.lora_state_dict()
    lora_params = sum(t.numel() for t in lora.values())
    ensemble = TeacherEnsemble([copy.deepcopy(r.teacher) for _ in range(tc.n_teachers)]).to(r.device)
    opt = torch.optim.AdamW(lora_parameters(proj), lr=tc.lr, weight_decay=tc.weight_decay)
    x1, y1 = sample.cycle(1)
    x1, y1 = to_float(x1).to(r.device), y1.to(r.device)
    flops = count_flops(lambda: transfer_step(proj, ensemble, x1, y1, opt, tc.ce_weight, epoch=1, step=0))
    B = r.batch(tc.batch_size // r.cfg.compute.num_workers, flops)
    x, y = sample.cycle(B)
    xf, y = to_float(x).to(r.device), y.to(r.device)
    step_s, cpu_s = timed_steps(lambda i: transfer_step(proj, ensemble, xf, y, opt, tc.ce_weight, epoch=1, step=i + 1),
                                r.steps, r.device)
    with tempfile.TemporaryDirectory() as tmp:
        meta = proj.save_adapter(tmp, dtype=tc.adapter_dtype)
        adapter_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        t0 = time.perf_counter()
        r.store.put_dir(r.scratch, tmp, prefix="adapter/")
        store_s = time.perf_counter() - t0
    r.projector, r.cpu_step_s = proj, cpu_s
    return StageRehearsal("transfer", "stages/transfer_core.transfer_step in the driver; adapter put "
                          "through the store", "train image x epoch", B, r.steps, step_s, flops, 0, "",
                          notes=notes, extra={"lora_params": lora_params, "lora_tensors": len(lora),
                                              "adapter_bytes": adapter_bytes, "adapter_store_s": store_s,
                                              "text_init_s_per_class": text_s, "weights_bytes": meta.get("weights_bytes")})


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    tc, train = b.cfg.transfer, b.train_images
    n = train * tc.epochs
    return {"work": f"{train:,} train x {tc.epochs} epochs ({tc.n_teachers} teachers) + {b.classes:,} class prompts",
            "items": n, "flops": n * s.flops_per_item,
            "seconds_here": n * b.item_s(s) + b.classes * s.extra["text_init_s_per_class"],
            "bytes": s.extra["adapter_bytes"], "bytes_what": "adapter", "units": b.cfg.compute.num_workers,
            "lora_params": s.extra["lora_params"]}


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    st, gpus = profile.get("stages", {}), cfg.compute.num_workers
    if "transfer_step" not in st or not train_images:
        return None
    t = train_images * cfg.transfer.epochs / float(st["transfer_step"]["images_per_s"]) / gpus
    return gpu_hours_row(gpus, t, t, "DDP")
