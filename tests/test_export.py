"""Distilled-set packages without Ray: export a small run built through the real artifact writers,
open it, label with it, and catch every kind of damaged file by name.

The run here is made by the same writers the stages use (image set, adapter of a LoRA'd tiny CLIP,
relabelled stored labels, evaluate results), finalized in a local store: no Ray is needed to export
or open, so none is started. The export of a real smoke run to S3 is in tests/test_pipeline.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hello_ray.data.imageset import write_image_set
from hello_ray.distilled import open as open_package
from hello_ray.cli.export import main as export_main
from hello_ray.distilled.export import ExportError, export, parse_labels
from hello_ray.formats import package as fmt
from hello_ray.formats.results import write_results
from hello_ray.labels import ProjectorLabels, RelabelPlan, relabel, write_stored_meta
from hello_ray.views import view_batch
from hello_ray.store import ArtifactNotFound, IntegrityError, StoreError, open_store

REPO = Path(__file__).resolve().parent.parent
NAMES = ["zero", "one/1", "two"]          # a '/' in a name: the folder must not use it raw
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A finished tiny run in a local store: select (6 images), transfer (adapter), evaluate."""
    from hello_ray.models.projector import Projector

    store = open_store(str(tmp_path_factory.mktemp("run") / "store"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    write_image_set(store, "select-aaaaaaaaaaaa", images, labels, NAMES, meta={"image_source": "rded", "ipc": 2})
    store.finalize("select-aaaaaaaaaaaa", "select", {}, {})
    torch.manual_seed(0)
    projector = Projector.from_clip("hello-tiny-rn", "random-init", NAMES).add_lora(2, 4)
    with torch.no_grad():   # a non-zero LoRA, so the adapter changes the logits
        for p in projector.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapter_dir = tmp_path_factory.mktemp("adapter")
    projector.save_adapter(adapter_dir)
    store.put_dir("transfer-bbbbbbbbbbbb", adapter_dir)
    store.finalize("transfer-bbbbbbbbbbbb", "transfer", {}, {})
    key = "evaluate-cccccccccccc"
    labeller = ProjectorLabels.from_store(store, "transfer-bbbbbbbbbbbb", 3, IMAGE_SIZE)
    plan = RelabelPlan(epochs=2, batch_size=4, image_size=IMAGE_SIZE, cutmix_alpha=1.0, seed=0)
    x = images.permute(0, 3, 1, 2)
    files = relabel(labeller.logits, x, plan, store, key)
    write_stored_meta(store, key, plan, 6, 3, files)
    rows = [{"student": "resnet18", "strategy": s, "seed": 0, "images": "distilled", "continual_steps": 0,
             "continual_step": 0, "top1": t, "label_bytes": b}
            for s, t, b in (("hard", 0.4, 56), ("projector", 0.5, labeller.shipped_bytes()), ("stored", 0.6, 9999))]
    write_results(store, key, rows, wall_s=1.0)
    store.finalize(key, "evaluate", {"data": {"image_size": IMAGE_SIZE}, "evaluate": {"label_precision": "fp32"}},
                   {"images": "select-aaaaaaaaaaaa", "teachers": "teachers-dddddddddddd",
                    "transfer": "transfer-bbbbbbbbbbbb"})
    return {"store": store, "key": key, "images": images, "labels": labels}


@pytest.fixture(scope="module")
def package(run, tmp_path_factory) -> tuple[str, dict]:
    to = str(tmp_path_factory.mktemp("pkgs") / "tiny-ipc2")
    out = export(run["key"], run["store"].uri, to, ["projector", "stored"])
    return to, out


def test_package_holds_the_run_and_opens(run, package):
    to, out = package
    pkg = open_package(to)
    assert pkg.class_names == NAMES
    assert pkg.images.dtype == torch.uint8 and pkg.images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(pkg.images, run["images"].permute(0, 3, 1, 2)) and torch.equal(pkg.labels, run["labels"])
    x, y = pkg.torch_dataset()[3]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == 1
    files = {f["name"] for f in run["store"].manifest(run["key"])["files"]}
    names = json.loads((Path(to) / "manifest.json").read_text())["files"]
    listed = {f["name"] for f in names}
    # the class folder of "one/1" is a safe name, in class order; every file has size + sha256
    assert "images/0001-one_1/00002.png" in listed and all(len(f["sha256"]) == 64 for f in names)
    assert {n for n in listed if n.startswith("labels/")} == {n for n in files if n.startswith("labels/stored")}
    assert {"adapter/adapter.json", "adapter/adapter.safetensors", "README.md", "distilled_images.png"} <= listed
    assert out["bytes"]["images"] > 0 and out["bytes"]["adapter"] > 0 and out["bytes"]["manifest"] > 0
    card = (Path(to) / "README.md").read_text()
    assert "![distilled images per class](distilled_images.png)" in card
    assert "| resnet18 | projector |" in card.replace("| distilled ", "") and "select-aaaaaaaaaaaa" in card
    # stored labels replay from the package exactly as from the run
    stored = pkg.stored()
    assert stored.epoch_views(1, 0)[0].logits.shape == (4, 3)


def test_labeller_equals_evaluate_path(run, package):
    """The package's labeller and evaluate's ProjectorLabels on the run's store: identical logits."""
    pkg = open_package(package[0])
    labeller = pkg.labeller("projector", precision="fp32")
    ref = ProjectorLabels.from_store(run["store"], "transfer-bbbbbbbbbbbb", 3, IMAGE_SIZE).to(
        torch.device("cpu")).with_precision("fp32")
    g = torch.Generator().manual_seed(1)
    _, views = view_batch(pkg.images, torch.arange(6), IMAGE_SIZE, 1.0, g)
    ours, theirs = labeller(views), ref.logits(views)
    assert ours.shape == (6, 3) and torch.equal(ours, theirs)
    assert not any(p.requires_grad for p in labeller.parameters())
    # the adapter matters: CLIP zero-shot (the text-initialised head alone) labels differently
    from hello_ray.models.projector import Projector

    zero_shot = ProjectorLabels(Projector.from_clip("hello-tiny-rn", "random-init", NAMES), 3, IMAGE_SIZE, 0)
    assert not torch.allclose(zero_shot.logits(views), ours, atol=1e-3)
    assert labeller.precision == "fp32" == pkg.info["projector"]["label_precision"]   # the run's precision


# Each kind of packaged file, and the reader that must catch its damage (the card and its figure are
# read by no loader: ``verify`` checks them).
DAMAGE = [("images/0002-two/00005.png", "open"), ("classes.json", "open"), ("package.json", "open"),
          ("adapter/adapter.safetensors", "labeller"), ("adapter/adapter.json", "labeller"),
          ("labels/stored/epoch_0001.npz", "stored"), ("labels/stored/meta.json", "stored"),
          ("README.md", "verify"), ("distilled_images.png", "verify")]


@pytest.mark.parametrize("name,reader", DAMAGE)
def test_flipped_byte_is_named(package, tmp_path, name, reader):
    """One flipped byte in a packaged file -> IntegrityError naming that file, from its own reader."""
    import shutil

    to = tmp_path / "copy"
    shutil.copytree(package[0], to)
    path = to / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    use = {"open": lambda p: None, "labeller": lambda p: p.labeller(),
           "stored": lambda p: p.stored().epoch_views(1, 0), "verify": lambda p: p.verify()}[reader]
    with pytest.raises(IntegrityError, match=re.escape(f"file {name} does not match")):
        use(open_package(str(to)))


def test_destination_rules(run, package, tmp_path, capsys):
    to, _ = package
    with pytest.raises(ExportError, match="not empty"):
        export(run["key"], run["store"].uri, to)
    assert export_main([run["key"], "--store", run["store"].uri, "--to", to]) == 1
    assert "--overwrite" in capsys.readouterr().err
    again = tmp_path / "again"
    assert export_main([run["key"], "--store", run["store"].uri, "--to", str(again), "--labels", "projector"]) == 0
    assert "package written" in capsys.readouterr().out
    assert export_main([run["key"], "--store", run["store"].uri, "--to", str(again), "--overwrite"]) == 0
    assert open_package(str(again)).info["labels"] == ["hard", "projector"]
    # not an evaluate key; an unknown label kind; a folder without a manifest (unfinished)
    with pytest.raises(ExportError, match="is a 'select' artifact"):
        export("select-aaaaaaaaaaaa", run["store"].uri, str(tmp_path / "x"))
    with pytest.raises(ExportError, match="subset of projector, stored"):
        parse_labels("projector,teacher")
    # stored labels asked of a run without them: refused before the destination is touched
    bare = "evaluate-eeeeeeeeeeee"
    write_results(run["store"], bare, [{"student": "resnet18", "strategy": "hard", "seed": 0, "images": "distilled",
                                        "continual_steps": 0, "continual_step": 0, "top1": 0.4, "label_bytes": 56}], 1.0)
    run["store"].finalize(bare, "evaluate", {}, {"images": "select-aaaaaaaaaaaa", "transfer": "transfer-bbbbbbbbbbbb"})
    with pytest.raises(ExportError, match="no stored labels"):
        export(bare, run["store"].uri, str(again), ["projector", "stored"], overwrite=True)
    assert open_package(str(again)).info["labels"] == ["hard", "projector"]
    with pytest.raises(StoreError, match="folder name 'my pkg'"):
        export(run["key"], run["store"].uri, str(tmp_path / "my pkg"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "package.json").write_text("{}")
    with pytest.raises(ArtifactNotFound, match="no manifest.json"):
        open_package(str(tmp_path / "half"))


def test_open_and_labeller_import_no_ray(package):
    """A receiver's process: open + labeller + a forward, and Ray was never imported."""
    code = ("import sys, torch, hello_ray.distilled as d\n"
            f"p = d.open({package[0]!r}); out = p.labeller()(p.images[:2].float() / 255)\n"
            "assert out.shape == (2, 3), out.shape\n"
            "print('ray' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"


def test_readme_quotes_the_training_loop():
    """docs/package.md's training-loop block is examples/train_on_package.py, character for character."""
    section = (REPO / "docs" / "package.md").read_text()
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == (REPO / "examples" / "train_on_package.py").read_text()


def test_class_folders_and_index_rules():
    assert fmt.class_folder(3, "a b/c") == "0003-a_b_c" and fmt.class_folder(12, "///") == "0012"
    folders = fmt.classes_doc(["x", "y"])["folders"]
    files = ["images/0000-x/00000.png", "images/0001-y/00001.png", "classes.json"]
    assert fmt.image_index(files, folders, "p") == (files[:2], [0, 1])
    with pytest.raises(fmt.PackageError, match="missing \\[1\\]"):
        fmt.image_index(["images/0000-x/00000.png", "images/0001-y/00002.png"], folders, "p")
    with pytest.raises(fmt.PackageError, match="not images/<class folder"):
        fmt.image_index(["images/0001-x/00000.png"], folders, "p")
    with pytest.raises(fmt.PackageError, match="expected '0001-y'"):
        fmt.check_classes_doc({"class_names": ["x", "y"], "folders": ["0000-x", "0001-z"]}, "p")
    assert np.array_equal(fmt.classes_doc(["x"])["folders"], ["0000-x"])
