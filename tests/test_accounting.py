"""Storage accounting and ``hello-ray storage``: the published figures, from real layer shapes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from hello_ray import cli
from hello_ray.accounting import (projector_lora_counts, stored_soft_label_bytes, storage_report)
from hello_ray.models.lora import conv_lora_params

MIB, GIB = 1024 ** 2, 1024 ** 3


def _rn50_conv_shapes() -> list[nn.Conv2d]:
    """RN50's image-encoder convs, built independently of the accounting code (meta device)."""
    with torch.device("meta"):
        model = open_clip.create_model("RN50", pretrained=None, device="meta")
    return [m for m in model.visual.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def imagenet_ipc1() -> dict:
    return storage_report(classes=1000, ipc=1)


def test_imagenet1k_ipc1_label_bytes(imagenet_ipc1):
    """METHOD.md: ImageNet-1K, IPC 1, 300 epochs -> 572.2 MiB of stored fp16 labels."""
    r = imagenet_ipc1
    assert r["stored_soft_labels_bytes"] == 300 * 1000 * 1000 * 2 == 600_000_000
    assert f"{r['stored_soft_labels_bytes'] / MIB:.1f}" == "572.2"
    assert r["images"] == 1000 and r["epochs"] == 300
    # IPC 200 -> ~110 GiB
    assert 105 < stored_soft_label_bytes(1000, 200, 300) / GIB < 115


def test_teacher_params_are_resnet18(imagenet_ipc1):
    assert imagenet_ipc1["teacher_params"] == 11_689_512  # the published 11.7M
    assert imagenet_ipc1["teacher_bytes_fp32"] == 4 * 11_689_512


def test_rn50_lora_count_from_real_layer_shapes(imagenet_ipc1):
    """The LoRA count of the accounting (add_lora applied) equals the per-layer formulas over RN50's
    real convs, and is the ~0.8M parameters METHOD.md quotes for ImageNet-1K."""
    r = imagenet_ipc1
    convs = _rn50_conv_shapes()
    conv = sum(conv_lora_params(c.in_channels, c.out_channels, c.kernel_size, 8, "separable") for c in convs)
    head = 128 * (1024 + 1000)  # head rank 128 for 1000 classes, RN50 embeds in 1024-d
    assert r["head_rank"] == 128 and r["conv_rank"] == 8 and r["lora_style"] == "separable"
    assert r["projector_lora_conv_layers"] == len(convs)
    assert r["projector_lora_conv_params"] == conv
    assert r["projector_lora_head_params"] == head
    assert r["projector_lora_params"] == conv + head == 776_776
    n, tensors = r["projector_lora_params"], r["projector_lora_tensors"]
    assert tensors == 2 * (len(convs) + 1)
    assert r["projector_lora_bytes_fp32"] == 4 * n
    assert r["projector_lora_bytes_fp16"] == 2 * n
    assert r["projector_lora_bytes_int8"] == n + 4 * tensors  # + one fp32 scale per tensor
    assert r["stored_soft_labels_bytes"] > 300 * r["projector_lora_bytes_fp16"]


def test_standard_style_and_head_rank_defaults():
    std = storage_report(classes=100, ipc=10, lora_style="standard")
    convs = _rn50_conv_shapes()
    conv = sum(conv_lora_params(c.in_channels, c.out_channels, c.kernel_size, 8, "standard") for c in convs)
    assert std["head_rank"] == 64  # <= 100 classes
    assert std["projector_lora_params"] == conv + 64 * (1024 + 100)
    assert std["stored_soft_labels_bytes"] == 300 * 1000 * 100 * 2
    sep = projector_lora_counts(100, 8, 64, "RN50", "separable")
    assert sep["params"] < std["projector_lora_params"]
    assert storage_report(classes=1000, ipc=1, head_rank=32)["projector_lora_head_params"] == 32 * 2024


def test_cli_json_through_hello_ray_main(capsys):
    rc = cli.main(["storage", "--classes", "1000", "--ipc", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)  # exactly one JSON object on stdout
    for key in ("stored_soft_labels_bytes", "teacher_params", "projector_lora_params",
                "projector_lora_bytes_fp32", "projector_lora_bytes_fp16", "projector_lora_bytes_int8"):
        assert isinstance(report[key], int), key
    assert report["stored_soft_labels_bytes"] == 600_000_000


def test_cli_table_and_options(capsys):
    rc = cli.main(["storage", "--classes", "10", "--ipc", "10", "--epochs", "40", "--conv-rank", "4",
                   "--head-rank", "8", "--clip-model", "hello-tiny-rn", "--lora-style", "standard",
                   "--image-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "stored soft labels" in out and "HeLlO projector LoRA (fp16)" in out
    assert f"{40 * 100 * 10 * 2:,} B" in out
    assert "hello-tiny-rn LoRA standard conv rank 4, head rank 8" in out
    assert cli.main(["storage", "--classes", "1000", "--ipc", "1"]) == 0
    out = capsys.readouterr().out
    assert "572.2 MiB" in out and "776,776 params" in out


def test_cli_errors_are_clear(capsys):
    assert cli.main(["storage", "--classes", "0", "--ipc", "1"]) == 2
    assert "classes must be >= 1" in capsys.readouterr().err
    assert cli.main(["storage", "--classes", "10", "--ipc", "1", "--clip-model", "RN5"]) == 2
    assert "unknown CLIP model 'RN5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["storage", "--classes", "10"])  # --ipc is required (argparse exits 2)


def test_console_script_subprocess():
    exe = shutil.which("hello-ray", path=str(Path(sys.executable).parent)) or shutil.which("hello-ray")
    assert exe, "the hello-ray console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "storage", "--classes", "1000", "--ipc", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["stored_soft_labels_bytes"] == 600_000_000
    assert report["projector_lora_params"] == 776_776


@pytest.mark.parametrize("classes,ipc,epochs,batch,prune", [(1000, 10, 300, 100, 10), (10, 10, 15, 25, 40),
                                                            (10, 3, 7, 4, 10), (100, 1, 300, 100, 20)])
def test_pruned_bytes_count_lpld_pool_views(classes, ipc, epochs, batch, prune):
    """stored/N bytes = the views of the first floor(T/N) label batches x classes x 2 (fp16)."""
    from hello_ray.accounting import pruned_label_bytes
    from hello_ray.labels import RelabelPlan

    images = classes * ipc
    plan = RelabelPlan(epochs=epochs, batch_size=batch, image_size=8, cutmix_alpha=1.0, seed=0, prune=prune)
    per_epoch = -(-images // batch)
    views = sum(images - b * batch if b == per_epoch - 1 else batch for _, b in plan.kept(images))
    assert pruned_label_bytes(classes, ipc, epochs, batch, prune) == views * classes * 2
    r = storage_report(classes=classes, ipc=ipc, epochs=epochs, batch_size=batch, prunes=(prune,))
    assert r["stored_pruned_bytes"][str(prune)] == views * classes * 2 < r["stored_soft_labels_bytes"]
