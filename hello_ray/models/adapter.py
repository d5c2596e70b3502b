"""The adapter artifact: what HeLlO ships with the distilled images instead of labels.

Two files in one folder:

- ``adapter.safetensors``: the LoRA tensors only (keys like ``encoder.layer1.0.conv2.lora_A.weight``),
  in fp32, fp16, or int8. int8 is symmetric per-tensor quantisation: ``q = round(w / s)``
  with ``s = max|w| / 127``, and the fp32 scale is stored alongside as ``<key>:scale``
  (shape [1]), i.e. 4 bytes per tensor on top of one byte per parameter.
- ``adapter.json``: everything needed to rebuild the rest -- CLIP model name and pretrained
  tag, class names, templates, ranks, parametrisation, alpha, dtype, parameter count. The
  base model is public and the head is recomputed from the class names, so neither is stored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
ADAPTER_FORMAT = 1
ADAPTER_DTYPES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = ":scale"


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: (q int8, scale fp32 [1]); an all-zero tensor gets scale 1."""
    t = t.detach().float()
    amax = t.abs().max()
    scale = (amax / 127.0) if amax > 0 else torch.tensor(1.0)
    q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
    return q, scale.reshape(1).float()


def encode_tensors(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """LoRA tensors -> the tensors written to ``adapter.safetensors`` for ``dtype``."""
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype {dtype!r}: choose one of {', '.join(ADAPTER_DTYPES)}")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        if dtype == "fp32":
            out[key] = t.float().contiguous()
        elif dtype == "fp16":
            out[key] = t.half().contiguous()
        else:
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(t)
    return out


def decode_tensors(stored: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`encode_tensors`: fp32 LoRA tensors (int8 ones de-quantised)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == torch.int8:
            scale = stored.get(key + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"{where}: int8 tensor {key!r} has no {key + SCALE_SUFFIX!r}")
            out[key] = t.float() * scale.float()
        else:
            out[key] = t.float()
    return out


def save_adapter(projector: Any, out_dir: str | Path, dtype: str = "fp16") -> dict[str, Any]:
    """Write ``adapter.safetensors`` + ``adapter.json`` of a LoRA'd projector into ``out_dir``.

    Returns the JSON written plus ``weights_bytes`` (the size of the safetensors file).
    Files are written to temporary names and renamed, weights first, so a crash never
    leaves a JSON pointing at missing or partial weights.
    """
    cfg = projector.lora_config
    if cfg is None:
        raise ValueError("save_adapter: the projector has no LoRA (call add_lora first)")
    tensors = projector.lora_state_dict()
    if not tensors:
        raise ValueError("save_adapter: the LoRA was merged and unloaded; save before merge_lora(unload=True)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_params = sum(t.numel() for t in tensors.values())
    meta = {
        "format": ADAPTER_FORMAT,
        "model": projector.model_name,
        "pretrained": projector.pretrained,
        "class_names": projector.class_names,
        "templates": projector.templates,
        "conv_rank": cfg["conv_rank"],
        "head_rank": cfg["head_rank"],
        "style": cfg["style"],
        "alpha_ratio": cfg["alpha_ratio"],
        "dtype": dtype,
        "num_params": num_params,
        "num_tensors": len(tensors),
    }
    weights = out_dir / ADAPTER_WEIGHTS
    tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(encode_tensors(tensors, dtype), str(tmp), metadata={"format": str(ADAPTER_FORMAT), "dtype": dtype})
    os.replace(tmp, weights)
    tmp = out_dir / f".{ADAPTER_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / ADAPTER_JSON)
    return {**meta, "weights_bytes": weights.stat().st_size}


def read_adapter_json(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_JSON} in {adapter_dir} (is it a transfer artifact folder?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in ("model", "pretrained", "class_names", "templates", "conv_rank", "head_rank",
                           "style", "alpha_ratio", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return meta


def read_adapter(adapter_dir: str | Path, num_classes: int | None = None
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(adapter.json, the fp32 LoRA tensors, the weights file's path for error messages) of an
    adapter folder; ``Projector.from_adapter`` (hello_ray/models/projector.py) builds on them.

    ``num_classes``: the class count the caller's dataset has; a different count in the adapter
    is a ValueError naming both, raised before the weights are read.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_json(adapter_dir)
    n = len(meta["class_names"])
    if num_classes is not None and n != num_classes:
        raise ValueError(f"adapter {adapter_dir} was trained for {n} classes, but {num_classes} "
                         f"classes are expected here")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"adapter {adapter_dir}: {ADAPTER_WEIGHTS} is missing")
    return meta, decode_tensors(load_file(str(weights)), where=str(weights)), str(weights)
