"""Projector cost vs a ResNet-18 teacher: the LoRA training step and the labelling forward.

    python benchmarks/projector_step.py                  # CPU defaults (about 2-3 minutes on 2 cores)
    python benchmarks/projector_step.py --json           # also the raw numbers as one JSON object

For the tiny test CLIP (32 px, the demo's size) and OpenAI's RN50 architecture (224 px), both
``pretrained="random-init"`` (seeded weights made once in the local cache: nothing is downloaded,
the cost is the same as with real weights), it prints the mean time of:

- ``teacher fwd``: one ResNet-18 forward on the batch (eval, inference_mode) -- the unit;
- ``train step``: one knowledge-transfer step of the projector alone (forward + backward through
  the frozen encoder into every LoRA tensor + AdamW), ``hello_ray.stages.transfer`` math with
  the teacher targets precomputed (a real step adds n_teachers x ``teacher fwd``);
- ``label fwd``: the projector forward that labels a batch, with the LoRA unmerged (extra A/B
  convs per layer), merged into the base weights, and merged then prepared as ``evaluate``
  labels (``hello_ray.labels.prepare_labeller``: BN folded, CLIP's attention pool computed for
  its one output token, channels-last), each in fp32 and under bf16 autocast;
- ``teacher prepared``: the ResNet-18 forward after the same preparation (BN folded, channels-last).

and each as a ratio to ``teacher fwd`` on the same batch. CUDA is used when present (then also
channels-last, as labelling runs there); bf16 runs where the device supports it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hello_ray.labels import prepare_labeller  # noqa: E402
from hello_ray.models.clip import RANDOM_INIT  # noqa: E402
from hello_ray.models.projector import Projector  # noqa: E402
from hello_ray.models.zoo import build_model  # noqa: E402
from hello_ray.stages.transfer_core import lora_parameters, transfer_loss  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bf16 everywhere (fast only with AVX512-BF16 / AMX)


def bench_clip(clip: str, image_size: int, batch: int, classes: int, conv_rank: int, head_rank: int,
               repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, device=device)  # [N,3,S,S] in [0,1]
    y = torch.randint(0, classes, (batch,), device=device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    teacher = build_model("resnet18", classes, image_size).to(device, memory_format=fmt).eval()
    # the prompts go through the text tower on ``device``: 1000 classes x 7 templates is slow on a CPU
    projector = Projector.from_clip(clip, RANDOM_INIT, class_names=[f"class {i}" for i in range(classes)],
                                    device=device)
    projector.add_lora(conv_rank, head_rank)
    with torch.no_grad():  # a trained-looking LoRA (B != 0), so unmerged and merged both do real work
        for p in lora_parameters(projector):
            p.normal_(0, 0.01)
    projector = projector.eval().to(device)
    merged = copy.deepcopy(projector).merge_lora().to(device, memory_format=fmt).eval()
    prepared = prepare_labeller(copy.deepcopy(merged), device, image_size)
    teacher_prepared = prepare_labeller(copy.deepcopy(teacher), device, image_size)
    projector = projector.to(memory_format=fmt)
    with torch.inference_mode():
        targets = teacher(x).float().unsqueeze(0)  # [1, N, C]
    targets = targets.clone()  # a normal tensor: usable in autograd
    opt = torch.optim.AdamW(lora_parameters(projector), lr=5e-4)
    use_bf16 = bf16_supported(device)

    x_cl = x.contiguous(memory_format=torch.channels_last)

    def label(model: torch.nn.Module, bf16: bool, channels_last: bool = False) -> Callable[[], object]:
        inputs = x_cl if channels_last else x

        def fn():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(inputs)
        return fn

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = projector(x)
        loss, _ = transfer_loss(logits.float(), targets, y, 0.1)
        loss.backward()
        opt.step()

    out = {"teacher_fwd_fp32": timed(label(teacher, False), device, repeats)}
    if use_bf16:
        out["teacher_fwd_bf16"] = timed(label(teacher, True), device, repeats)
    out["teacher_prepared_fp32"] = timed(label(teacher_prepared, False, True), device, repeats)
    if use_bf16:
        out["teacher_prepared_bf16"] = timed(label(teacher_prepared, True, True), device, repeats)
    out["train_step"] = timed(train_step, device, repeats)
    for name, model in (("unmerged", projector), ("merged", merged), ("prepared", prepared)):
        cl = name == "prepared"
        out[f"label_{name}_fp32"] = timed(label(model, False, cl), device, repeats)
        if use_bf16:
            out[f"label_{name}_bf16"] = timed(label(model, True, cl), device, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--tiny-batch", type=int, default=256 if cuda else 64)
    ap.add_argument("--rn50-batch", type=int, default=256 if cuda else 8)
    ap.add_argument("--classes", type=int, default=100, help="head size (100: ImageNet-100, head rank 64)")
    ap.add_argument("--repeats", type=int, default=20 if cuda else 3)
    ap.add_argument("--clip", nargs="+", default=["hello-tiny-rn", "RN50"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    head_rank = 64 if args.classes <= 100 else 128
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{args.classes} classes, LoRA conv rank 8 / head rank {head_rank}, {args.repeats} timed reps",
          flush=True)
    results = {}
    for clip in args.clip:
        size, batch = (32, args.tiny_batch) if clip == "hello-tiny-rn" else (224, args.rn50_batch)
        r = bench_clip(clip, size, batch, args.classes, 8, head_rank, args.repeats, device)
        results[clip] = {"image_size": size, "batch": batch, **r}
        unit = r["teacher_fwd_fp32"]
        print(f"{clip}: batch {batch} at {size} px; teacher = ResNet-18 forward fp32 "
              f"{unit * 1e3:.1f} ms", flush=True)
        for k, v in r.items():
            print(f"  {k:<22} {v * 1e3:9.1f} ms   {v / unit:6.2f}x teacher fwd", flush=True)
    if args.json:
        print(json.dumps({"device": str(device), "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
