"""images.source=external: an RDED-layout and an SRe2L-layout folder (made here, 10 tiny classes)
become image sets that evaluate trains on with hard, teacher, stored and projector labels; class
mappings are explicit and a mismatch fails before any compute, naming both orders."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hello_ray.config import load_config
from hello_ray.data.errors import CorruptImageError
from hello_ray.data.imageset import load_image_set
from hello_ray.stages import evaluate, external
from hello_ray.stages.external_core import ExternalClassError, detect_layout, map_classes
from hello_ray.store import open_store
from builders import DEMO_KEYS, pixels, write_external_set
from builders import write_adapter, write_teachers

SIZE = load_config("smoke").data.image_size  # 24 px


def _write_set(root: Path, layout: str, ipc: int = 2, size: int = SIZE, names: list[str] | None = None) -> Path:
    return write_external_set(root, layout, ipc, size, names)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """The demo data's store with a 3-epoch trajectory and an adapter (as test_evaluate builds them)."""
    root = tmp_path_factory.mktemp("external")
    cfg = load_config("smoke", overrides=[f"store={root / 'store'}"])
    store = open_store(cfg.store)
    from hello_ray.data.sources import load_split

    names = load_split(cfg.data, cfg.data.train_split, store).class_names
    write_teachers(store, "resnet18", [str(i) for i in range(len(names))], cfg.data.image_size, (1, 2, 3),
                   key="teachers-test", epoch_fields={"top1": 0.1})
    write_adapter(store, "transfer-test", names)
    return root, cfg.store, names


def _cfg(store: str, path: Path, *extra: str):
    return load_config("smoke", overrides=[f"store={store}", "images.source=external", f"images.path={path}",
                                           "evaluate.strategies=[hard, teacher, stored, projector]",
                                           "evaluate.epochs=1", *extra])


@pytest.mark.parametrize("layout", ["rded", "sre2l"])
def test_reference_layouts_evaluate_with_every_label_strategy(world, layout):
    """The set's pixels land in our image set under the class its folder number names, and evaluate
    trains a student with each strategy on it (a Ray Train run: the thing under test is that the
    external set plugs into evaluate unchanged)."""
    from hello_ray.pipeline import Run, run_external, run_stage

    root, store_uri, names = world
    src = _write_set(root / f"set-{layout}", layout)
    cfg = _cfg(store_uri, src)
    run = Run.start(cfg)
    key = run_external(run)
    assert key.startswith("external-") and run_external(run) == key            # keyed, then cached
    s = load_image_set(run.store, key)
    assert s.meta["image_source"] == "external" and s.meta["external"]["layout"] == layout
    assert s.class_names == names and s.labels.tolist() == [c for c in range(10) for _ in range(2)]
    # JPEG in, PNG out: the decoded JPEG pixels exactly, in ImageFolder order
    first = f"{0:05d}/class00000_id00001.jpg" if layout == "rded" else "new000/class000_id001.jpg"
    jpeg = np.asarray(Image.open(src / first).convert("RGB"))
    assert np.array_equal(s.images[1].numpy(), jpeg) and s.index.file[1] == first

    labels = None
    if layout == "sre2l":  # and SRe2L's relabel records for it, imported: the stored row replays them
        from hello_ray.labels import StoredLabels
        from hello_ray.labels_fkd import import_fkd
        from builders import write_sre2l_records

        write_sre2l_records(root / "sre2l-records", 20, 10, 1, 10, size=SIZE)
        labels = import_fkd(str(root / "sre2l-records"), run.store, key)
        cfg = _cfg(store_uri, src, f"evaluate.stored_labels={labels}",
                   "evaluate.strategies=[hard, teacher, stored, stored/2, projector]")
    ev = run_stage(evaluate, cfg, run.store, {"images": key, "teachers": "teachers-test",
                                               "transfer": "transfer-test"})
    df = pd.read_parquet(io.BytesIO(run.store.get_bytes(ev, "results.parquet")))
    assert sorted(df.strategy) == ["hard", "projector", "stored"] + (["stored/2"] if labels else []) + ["teacher"]
    assert (df.train_images == 20).all() and df.top1.between(0, 1).all() and (df.steps == 2).all()
    relabelled = [f for f in run.store.list_files(ev) if f.startswith("labels/stored/")]
    if labels:  # nothing relabelled: the imported views and their bytes; stored/2 = LPLD's pool of them
        assert not relabelled
        by = dict(zip(df.strategy, df.label_bytes))
        assert by["stored"] == StoredLabels(run.store, labels).shipped_bytes()
        pool = StoredLabels(run.store, ev, 2)
        assert pool.meta["kept"] == [[0, 0]] and by["stored/2"] == pool.shipped_bytes() < by["stored"]
        assert torch.equal(pool.pool()[0].logits, StoredLabels(run.store, labels).epoch_views(0, 0)[0].logits)
    else:
        assert relabelled

    # An edited set is another set: a new key, never the cached one.
    edited = "00003/class00003_id00000.jpg" if layout == "rded" else "new003/class003_id000.jpg"
    Image.fromarray(pixels(9, 9, SIZE)).save(src / edited)
    assert Run.start(cfg).stage_config(external)["external"] != run.stage_config(external)["external"]


def test_names_mapping_and_order_mismatch_fail_before_compute(world, capsys):
    """Folders named like the demo classes sort alphabetically (eight, five, four, ...), not in the
    training label order (zero, one, ...): by index that would shift every class, so the run is
    refused at Run.start, before the teachers train, naming both orders; class_order=names maps by
    name; a wrong count and a bad explicit mapping are refused too."""
    from hello_ray.pipeline import Run, run_external

    root, store_uri, _ = world
    src = _write_set(root / "set-names", "folders", ipc=1)
    store = open_store(store_uri)
    before = set(store.list_artifacts())
    with pytest.raises(ExternalClassError, match=r"external folders \(sorted\): \['eight', 'five'.*"
                       r"training classes \(label order\): \[0: zero, 1: one"):
        Run.start(_cfg(store_uri, src))
    assert set(store.list_artifacts()) == before                                 # nothing ran
    from hello_ray.pipeline import main

    assert main(["--preset", "smoke", f"store={store_uri}", "images.source=external", f"images.path={src}"]) == 2
    assert "sort into another order" in capsys.readouterr().err and set(store.list_artifacts()) == before
    run = Run.start(_cfg(store_uri, src, "images.class_order=names"))
    s = load_image_set(run.store, run_external(run))
    assert dict(zip(s.index.folder, s.labels.tolist())) == {k: i for i, k in enumerate(DEMO_KEYS)}

    with pytest.raises(ExternalClassError, match="no training class named.*'eight -> huit'"):
        Run.start(_cfg(store_uri, src, "images.class_map={" + ", ".join(
            f"{k}: {'huit' if k == 'eight' else k}" for k in DEMO_KEYS) + "}"))
    from hello_ray.config import ConfigError

    with pytest.raises(ConfigError, match="'evaluate.stored_labels': artifact labels-nope: no stored labels"):
        Run.start(_cfg(store_uri, src, "images.class_order=names", "evaluate.stored_labels=labels-nope"))
    (src / "eleven").mkdir()
    Image.fromarray(pixels(11, 0, SIZE)).save(src / "eleven" / "a.png")
    with pytest.raises(ExternalClassError, match="has 11 class folders but the training set has 10"):
        Run.start(_cfg(store_uri, src, "images.class_order=names"))


def test_corrupt_and_wrong_size_images_are_named(world):
    from hello_ray.data.errors import DataError
    from hello_ray.pipeline import Run, run_external

    root, store_uri, _ = world
    src = _write_set(root / "set-bad", "rded", ipc=1)
    Image.fromarray(pixels(0, 5, 40)).save(src / "00004" / "class00004_id00001.jpg")   # 40 px, not 24
    run = Run.start(_cfg(store_uri, src))
    s = load_image_set(run.store, run_external(run))
    big = s.index[s.index.height == 40]
    assert big.file.tolist() == ["00004/class00004_id00001.jpg"] and s.images.shape[1:] == (SIZE, SIZE, 3)
    with pytest.raises(DataError, match=f"class00004_id00001.jpg is 40x40 px, not data.image_size {SIZE}x{SIZE}"):
        run_external(Run.start(_cfg(store_uri, src, "images.resize=false")))
    (src / "00007" / "class00007_id00003.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(CorruptImageError, match=r"set-bad/00007/class00007_id00003.jpg"):
        run_external(Run.start(_cfg(store_uri, src)))


KEYS = ["cat", "dog", "eel"]


@pytest.mark.parametrize("folders, layout, order, cmap, want", [
    (["00000", "00001", "00002"], "rded", "index", {}, [0, 1, 2]),
    (["new000", "new001", "new002"], "sre2l", "index", {}, [0, 1, 2]),
    (["a", "b", "c"], "folders", "index", {}, [0, 1, 2]),                       # names unlike classes
    (["cat", "dog", "eel"], "folders", "index", {}, [0, 1, 2]),                 # same order: fine
    (["dog", "eel", "cat"], "folders", "names", {}, [1, 2, 0]),
    (["Dog", "cat", "x"], "folders", "names", {"Dog": "dog", "cat": "cat", "x": "Eel the fish"}, [1, 0, 2]),
    (["00000", "00001", "00002"], "rded", "index", {"00000": "eel", "00001": "dog", "00002": "cat"}, [2, 1, 0]),
])
def test_map_classes_table(folders, layout, order, cmap, want):
    names = ["Cat", "Dog", "Eel the fish"]
    assert map_classes(sorted(folders), layout, order, cmap, KEYS, names, "set") == \
        [want[folders.index(f)] for f in sorted(folders)]


@pytest.mark.parametrize("folders, layout, order, cmap, words", [
    (["00000", "00001"], "rded", "index", {}, "has 2 class folders but the training set has 3"),
    (["00000", "00001", "00003"], "rded", "index", {}, r"folders \['00003'\] name class indices beyond"),
    (["00001", "000001", "00002"], "rded", "index", {}, "name the same class index"),
    (["cat", "dog", "emu"], "folders", "names", {}, r"no training class named \['emu'\]"),
    (["a", "b", "c"], "folders", "index", {"a": "cat", "b": "cat", "c": "eel"}, "map to the same training"),
    (["a", "b", "c"], "folders", "index", {"a": "cat", "b": "dog"}, r"no mapping for folders \['c'\]"),
])
def test_map_classes_refuses_mismatches_naming_both_orders(folders, layout, order, cmap, words):
    with pytest.raises(ExternalClassError, match=words) as e:
        map_classes(sorted(folders), layout, order, cmap, KEYS, ["Cat", "Dog", "Eel"], "set")
    assert "external folders (sorted)" in str(e.value) and "training classes (label order): [0: cat (Cat)" in str(e.value)


def test_folders_named_like_classes_in_another_order_are_refused():
    """Plain folders sort alphabetically; a training set whose label order is not alphabetical
    (parquet with classes.json, a mapping) would be shifted by position: refused, both orders named."""
    with pytest.raises(ExternalClassError, match=r"folder 'ant' is position 0, training class 'zebra'.*"
                       r"external folders \(sorted\): \['ant', 'cat', 'zebra'\].*\[0: zebra, 1: ant, 2: cat\]"):
        map_classes(["ant", "cat", "zebra"], "folders", "index", {}, ["zebra", "ant", "cat"],
                    ["zebra", "ant", "cat"], "set")


def test_detect_layout():
    assert detect_layout(["00000", "00001"], "auto", "s") == "rded"
    assert detect_layout(["new000", "new1000"], "auto", "s") == "sre2l"
    assert detect_layout(["new000", "cat"], "auto", "s") == "folders"
    with pytest.raises(ExternalClassError, match=r"expects folders named new000.*\['cat'\]"):
        detect_layout(["new000", "cat"], "sre2l", "s")


def test_an_external_set_on_s3_reads_like_a_local_one(world, s3_bucket):
    """images.path=s3://...: listed, fingerprinted (ETags) and read through the store's S3 layer."""
    import boto3

    from hello_ray.pipeline import Run, run_external

    root, store_uri, _ = world
    src = _write_set(root / "set-s3", "sre2l", ipc=1)
    bucket = s3_bucket.split("/")[2]
    client = boto3.client("s3")
    for f in sorted(src.rglob("*.jpg")):
        client.put_object(Bucket=bucket, Key=f"syn/{f.relative_to(src).as_posix()}", Body=f.read_bytes())
    remote = Run.start(_cfg(store_uri, f"s3://{bucket}/syn"))
    local = Run.start(_cfg(store_uri, src))
    a, b = load_image_set(remote.store, run_external(remote)), load_image_set(local.store, run_external(local))
    assert np.array_equal(a.images.numpy(), b.images.numpy()) and a.labels.tolist() == b.labels.tolist()
    assert a.meta["external"]["path"] == f"s3://{bucket}/syn" and remote.keys["external"] != local.keys["external"]


def test_preflight_checks_and_rehearses_an_external_set(world):
    """hello-ray preflight on images.source=external: the folders are mapped as Run.start maps them
    (a mismatch is the failed check 'images.external', naming both orders), the stage's resources
    are a driver-side ask, and the rehearsal reads a few of the set's own images into the cost table."""
    from hello_ray.preflight import checks
    from hello_ray.preflight.cost import cost_table, load_devices
    from hello_ray.preflight.rehearsal import Rehearsal

    root, store_uri, names = world
    src = _write_set(root / "set-preflight", "rded", ipc=2)
    report, store = checks.run_checks(_cfg(store_uri, src), probe_network=False)
    assert report.ok, report.failures()
    assert report.facts["external_images"] == 20 and "images.external" in {c.name for c in report.checks}
    reh = Rehearsal(_cfg(store_uri, src), store, len(names), names, "random-init", steps=2)
    (r,) = reh.run(["external"], startup=False)
    assert r.stage == "external" and r.steps == 2 and r.step_s > 0
    (row,) = cost_table(_cfg(store_uri, src), report.facts, [r], load_devices())["stages"]
    assert row["items"] == 20 and row["bytes"] > 0 and row["seconds_here"] > 0

    named = _write_set(root / "set-preflight-names", "folders", ipc=1)  # alphabetical != label order
    report, _ = checks.run_checks(_cfg(store_uri, named), probe_network=False)
    (failure,) = report.failures()
    assert failure.name == "images.external" and "training classes (label order)" in failure.detail
