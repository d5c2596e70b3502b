"""Artifact keys that mean what they say: a dataset edited in place gives new keys to the stages
that read it; a renamed class or another observer epoch does not retrain the teachers; a local
weights file is keyed by its content. Keys only: nothing trains here (no Ray)."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hello_ray.config import load_config
from hello_ray.data.fingerprint import split_fingerprint
from hello_ray.pipeline import Run
from hello_ray.stages import evaluate, recover, select, teachers, transfer
from hello_ray.store import open_store

STAGES = {"teachers": (teachers, {}), "select": (select, {"teachers": "teachers-0"}),
          "recover": (recover, {"teachers": "teachers-0"}),
          "transfer": (transfer, {"teachers": "teachers-0"}),
          "evaluate": (evaluate, {"images": "select-0", "teachers": "teachers-0", "transfer": "transfer-0"})}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_folder(root: Path, classes: list[str], per_class: int = 2) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i}.png").write_bytes(_png(100 * c + i + (50 if split == "val" else 0)))


def _keys(store, source: Path, *overrides: str) -> dict[str, str]:
    """The key of every data-reading stage, as pipeline.Run.needs derives it (a fresh Run: no
    memory; without needs' lease, which only a writer takes)."""
    cfg = load_config("smoke", overrides=[f"store={store.uri}", f"data.source={source}", *overrides])
    run = Run(cfg, store)
    return {name: store.artifact_key(stage.STAGE, run.stage_config(stage), inputs)
            for name, (stage, inputs) in STAGES.items()}


def _changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {s for s in a if a[s] != b[s]}


def test_a_folder_dataset_changed_in_place_gives_new_keys(tmp_path):
    store = open_store(str(tmp_path / "store"))
    data = tmp_path / "data"
    _write_folder(data, ["cat", "dog"])
    first = _keys(store, data)
    assert _keys(store, data) == first  # deterministic

    (data / "train" / "dog" / "1.png").write_bytes(_png(999))  # an image replaced
    replaced = _keys(store, data)
    assert _changed(first, replaced) == set(STAGES)

    (data / "val" / "cat" / "0.png").write_bytes(_png(998))  # select reads the training split only
    assert _changed(replaced, _keys(store, data)) == {"teachers", "transfer", "evaluate"}

    before = _keys(store, data)
    _write_folder(data, ["cat", "dog", "emu"])  # a class added (train and val)
    assert _changed(before, _keys(store, data)) == set(STAGES)

    moved = tmp_path / "elsewhere"  # same files, sizes and mtimes: the same fingerprint (the keys
    shutil.copytree(data, moved, copy_function=shutil.copy2)  # also hold data.source, the place)
    cfg = load_config("smoke", overrides=[f"data.source={data}"]).data
    assert split_fingerprint(cfg, "train") == split_fingerprint(
        load_config("smoke", overrides=[f"data.source={moved}"]).data, "train")


def test_class_names_and_observer_do_not_retrain_the_teachers(tmp_path):
    store = open_store(str(tmp_path / "store"))
    data = tmp_path / "data"
    _write_folder(data, ["cat", "dog"])
    base = _keys(store, data)
    renamed = _keys(store, data, "data.class_names=[kitten, puppy]")
    assert _changed(base, renamed) == {"select", "recover", "transfer", "evaluate"}  # prompts, image sets
    mapped = _keys(store, data, "data.class_names={cat: kitten, dog: puppy}")
    assert _changed(base, mapped) == {"select", "recover", "transfer", "evaluate"}
    assert _changed(mapped, _keys(store, data, "data.class_names={cat: kitty, dog: puppy}")) == \
        {"select", "recover", "transfer", "evaluate"}  # the names, not only the classes they name
    observer = _keys(store, data, "teachers.observer=epoch:2")
    assert _changed(base, observer) == {"select", "recover", "evaluate"}  # scores, synthesises, labels
    no_teacher_labels = ["evaluate.strategies=[hard, projector]", "evaluate.floor=false"]
    assert _keys(store, data, *no_teacher_labels)["evaluate"] == \
        _keys(store, data, *no_teacher_labels, "teachers.observer=epoch:2")["evaluate"]


def test_parquet_class_file_keys_the_stages_that_use_names(tmp_path):
    """A parquet dataset's classes.json: renaming there changes select/transfer/evaluate, not the
    teachers (nor recover, whose names come from the trajectory or data.class_names); a rewritten
    shard changes all."""
    from builders import make_samples, write_parquet

    store = open_store(str(tmp_path / "store"))
    data = tmp_path / "pq"
    samples = make_samples(per_class=2)
    for split in ("train", "val"):
        write_parquet(data, split, samples)
    base = _keys(store, data)
    (data / "classes.json").write_text('["pie", "fish", "horse"]')
    assert _changed(base, _keys(store, data)) == {"select", "transfer", "evaluate"}
    before = _keys(store, data)
    write_parquet(data, "train", make_samples(seed=1, per_class=2))
    assert _changed(before, _keys(store, data)) == set(STAGES)


def test_s3_fingerprint_follows_etags_not_places(s3_bucket, tmp_path):
    """On S3 the version is the ETag: a replaced object changes the fingerprint, a copy of the
    dataset under another prefix keeps it."""
    import boto3

    from builders import upload

    _write_folder(tmp_path / "data", ["cat", "dog"])
    bucket = s3_bucket.split("/")[2]
    src = upload(tmp_path / "data", f"s3://{bucket}/ds")
    store = open_store(s3_bucket)
    cfg = load_config("smoke", overrides=[f"data.source={src}"]).data
    first = split_fingerprint(cfg, "train", store)
    assert first["files"] == 4 and first["format"] == "imagefolder"
    copy = upload(tmp_path / "data", f"s3://{bucket}/copy")
    assert split_fingerprint(load_config("smoke", overrides=[f"data.source={copy}"]).data, "train", store) == first
    edited = bytearray((tmp_path / "data/train/cat/0.png").read_bytes())
    edited[-20] ^= 0xFF  # same size, other content
    boto3.client("s3").put_object(Bucket=bucket, Key="ds/train/cat/0.png", Body=bytes(edited))
    assert split_fingerprint(cfg, "train", store)["sha256"] != first["sha256"]


def test_the_manifest_records_the_fingerprint(tmp_path):
    store = open_store(str(tmp_path / "store"))
    data = tmp_path / "data"
    _write_folder(data, ["cat", "dog"])
    cfg = load_config("smoke", overrides=[f"store={store.uri}", f"data.source={data}"])
    run = Run(cfg, store)
    assert run.needs(teachers, {})
    store.put_bytes(run.keys["teachers"], "trajectory.json", b"{}")
    run.done(teachers, {}, {"epochs": 0})
    manifest = store.manifest(run.keys["teachers"])
    fp = manifest["summary"]["dataset"]["train"]
    assert fp == manifest["config"]["dataset"]["train"] and fp["files"] == 4 and fp["format"] == "imagefolder"
    assert "class_file" not in fp and "observer" not in manifest["config"]["teachers"]


def test_a_local_weights_file_is_keyed_by_content_hashed_once(tmp_path, monkeypatch):
    from hello_ray.models.clip import pretrained_identity

    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a" / "weights.pt"
    a.parent.mkdir()
    a.write_bytes(os.urandom(1 << 16))
    first = pretrained_identity(str(a))
    assert first.startswith("file-sha256:") and pretrained_identity("openai") == "openai"
    b = tmp_path / "b.pt"
    shutil.copy2(a, b)
    assert pretrained_identity(str(b)) == first  # the content, not the path

    # Same size and mtime: the remembered hash is used (the file is not read again) ...
    st = a.stat()
    a.write_bytes(os.urandom(1 << 16))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pretrained_identity(str(a)) == first
    # ... a new mtime (any real rewrite) re-hashes.
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert pretrained_identity(str(a)) != first
    cfg_a = load_config("smoke", overrides=[f"transfer.pretrained={a}"])
    cfg_b = load_config("smoke", overrides=[f"transfer.pretrained={b}"])
    assert transfer.stage_config(cfg_a) != transfer.stage_config(cfg_b)
    shutil.copy2(a, b)
    assert transfer.stage_config(cfg_a) == transfer.stage_config(cfg_b)


@pytest.fixture(autouse=True)
def _tests_dir_on_path(monkeypatch):
    """test_data_sources' dataset writers, imported by name."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
