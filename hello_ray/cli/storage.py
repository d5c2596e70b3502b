"""``hello-ray storage``: the bytes each label strategy ships, from the real layer shapes (no compute;
the numbers are :mod:`hello_ray.accounting`'s)."""
from __future__ import annotations

import argparse
import json
import sys

from hello_ray.accounting import format_report, storage_report
from hello_ray.models.lora import LORA_STYLES


def main(argv: list[str] | None = None) -> int:
    """``hello-ray storage``: print the label storage of each strategy (``--json``: one JSON object)."""
    ap = argparse.ArgumentParser(prog="hello-ray storage", description=(
        "Storage accounting: what each way of labelling a distilled set costs to ship."))
    ap.add_argument("--classes", type=int, required=True, help="number of classes (ImageNet-1K: 1000)")
    ap.add_argument("--ipc", type=int, required=True, help="synthetic images per class")
    ap.add_argument("--epochs", type=int, default=300, help="student epochs the labels cover")
    ap.add_argument("--conv-rank", type=int, default=8, help="LoRA rank on the encoder convs")
    ap.add_argument("--head-rank", type=int, default=None,
                    help="LoRA rank on the head (default 64 for <= 100 classes, else 128)")
    ap.add_argument("--clip-model", default="RN50", help="open_clip model of the projector")
    ap.add_argument("--lora-style", default="separable", choices=LORA_STYLES, help="conv LoRA parametrisation")
    ap.add_argument("--teacher", default="resnet18", help="zoo architecture of the teacher")
    ap.add_argument("--image-size", type=int, default=224, help="teacher input size (stem choice)")
    ap.add_argument("--batch-size", type=int, default=100, help="label batch size (evaluate.batch_size)")
    ap.add_argument("--json", action="store_true", help="emit one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        report = storage_report(args.classes, args.ipc, epochs=args.epochs, conv_rank=args.conv_rank,
                                batch_size=args.batch_size,
                                head_rank=args.head_rank, clip_model=args.clip_model,
                                lora_style=args.lora_style, teacher=args.teacher, image_size=args.image_size)
    except ValueError as e:
        print(f"hello-ray storage: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0
