"""Reads checked against the manifest, hostile names and pickles refused, durable local finalize,
format on reuse, and ``hello-ray ls / rm / gc``: on a local folder and on the moto S3 server.

The artifacts are small and written with the store API and the real writers (trajectory, image
set, relabel pass), then read back through the real readers (models/ensemble.py,
data/imageset.py, labels.py): no training. A byte is flipped in the stored object itself
(the file on disk, or the S3 object rewritten with plain boto3), as bit rot or a stray writer would.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import types
from pathlib import Path

import boto3
import pytest
from builders import write_teachers
import torch

from hello_ray import cli, launcher
from hello_ray.data.imageset import image_name, load_image_set, write_image_set
from hello_ray.formats.trajectory import epoch_file
from hello_ray.housekeeping import collect, list_entries
from hello_ray.labels import LABELS_DIR, RelabelPlan, StoredLabels, relabel, write_stored_meta
from hello_ray.models.ensemble import TeacherEnsemble, load_observer, load_state
from hello_ray.store import (
    FORMAT_VERSION,
    LEASE_DIR,
    MANIFEST,
    RAY_DIR,
    IntegrityError,
    StoreError,
    open_store,
)

MODEL, C, S = "shufflenet_v2_x0_5", 4, 16   # a 1.4 MB state_dict: real checkpoints, cheap to write


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch):
    """A fresh store (local folder or moto S3) with its own download cache."""
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache"))
    uri = request.getfixturevalue("file_store_uri" if request.param == "file" else "s3_bucket")
    return open_store(uri)


def _s3(uri: str) -> tuple:
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]), bucket, prefix


def _raw(store, key: str, name: str) -> bytes:
    """The stored object's bytes, read around the store (as an outside reader would)."""
    if store.uri.startswith("s3://"):
        s3, bucket, prefix = _s3(store.uri)
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}/{name}")["Body"].read()
    return (store.root / key / name).read_bytes()


def _overwrite(store, key: str, name: str, data: bytes) -> None:
    """Replace the stored object behind the store's back (bit rot, a stray writer)."""
    if store.uri.startswith("s3://"):
        s3, bucket, prefix = _s3(store.uri)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}/{name}", Body=data)
    else:
        (store.root / key / name).write_bytes(data)


def _flip(store, key: str, name: str) -> None:
    """Flip one bit in the middle of the stored file (same size)."""
    data = bytearray(_raw(store, key, name))
    data[len(data) // 2] ^= 0x01
    _overwrite(store, key, name, bytes(data))


def _teachers(store, key: str, planted: bytes | None = None) -> None:
    """A two-epoch trajectory; ``planted`` replaces epoch 1's checkpoint (the manifest matches it)."""
    write_teachers(store, MODEL, list("abcd"), S, (1, 2), key=key, planted=planted or None,
                   epoch_fields={"top1": 0.25, "loss": 1.0, "train_acc": 0.3})


def _image_set(store, key: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, S, S, 3), generator=g, dtype=torch.uint8)
    write_image_set(store, key, images, torch.arange(6) % C, list("abcd"))
    store.finalize(key, "select", {})


def _stored_labels(store, key: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, S, S), generator=g, dtype=torch.uint8)
    labels = torch.arange(6) % C
    for prune in (1, 2):
        plan = RelabelPlan(epochs=2, batch_size=4, image_size=S, cutmix_alpha=1.0, seed=3, prune=prune)
        files = relabel(lambda x: torch.randn(len(x), C), images, plan, store, key)
        write_stored_meta(store, key, plan, len(images), C, files)
    store.finalize(key, "evaluate", {})


def _read_stored(store, key: str, prune: int) -> None:
    labels = StoredLabels(store, key, prune)
    labels.epoch_views(0, seed=1)
    labels.epoch_views(1, seed=1)


def _download(store, key: str) -> Path:
    """download() as a machine without a copy yet sees it (S3; a local store checks in place)."""
    shutil.rmtree(store.cache_dir(key), ignore_errors=True) if store.uri.startswith("s3://") else None
    return store.download(key)


# artifact kind -> (writer, the file to damage, every real read path that must name it)
KINDS = {
    "teacher checkpoint": (_teachers, epoch_file(2), [
        lambda st, k: load_state(st, k, epoch_file(2)),
        lambda st, k: TeacherEnsemble.from_trajectory(st, k, "1-2", 2),
        lambda st, k: load_observer(st, k),
        _download,
    ]),
    "image set png": (_image_set, image_name(3), [load_image_set, _download]),
    "image set index": (_image_set, "index.parquet", [load_image_set, _download]),
    "stored labels": (_stored_labels, f"{LABELS_DIR}/stored/epoch_0001.npz", [
        lambda st, k: _read_stored(st, k, 1), _download]),
    "pruned stored labels": (_stored_labels, f"{LABELS_DIR}/stored-2/epoch_0000.npz", [
        lambda st, k: StoredLabels(st, k, 2).pool(), _download]),
    "stored-label meta": (_stored_labels, f"{LABELS_DIR}/stored/meta.json", [
        lambda st, k: StoredLabels(st, k, 1), _download]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flipped_byte_is_named_on_every_read_path(store, kind):
    write, name, readers = KINDS[kind]
    key = f"{kind.split()[0]}-0123456789ab"
    write(store, key)
    for read in readers:  # intact: every path reads (and the local download stamps the folder)
        read(store, key)
    _flip(store, key, name)
    for read in readers:
        with pytest.raises(IntegrityError) as err:
            read(store, key)
        msg = str(err.value)
        assert f"artifact {key}: file {name} does not match its manifest" in msg, msg
        assert "sha256" in msg and f"hello-ray rm {key} --store {store.uri}" in msg, msg


def test_a_flipped_byte_in_the_demo_dataset_is_named_before_ray_data_reads_it(store):
    """The demo shards are a store artifact read by Ray Data's parquet reader (by URI, past
    get_bytes): reusing them checks them first."""
    from hello_ray.data.demo import DEMO_CONFIG, DEMO_STAGE, ensure_demo_dataset

    uri = ensure_demo_dataset(store)
    key = store.artifact_key(DEMO_STAGE, DEMO_CONFIG)
    assert ensure_demo_dataset(store) == uri
    _flip(store, key, "train-00001-of-00002.parquet")
    with pytest.raises(IntegrityError, match=f"artifact {key}: file train-00001-of-00002.parquet does not match"):
        ensure_demo_dataset(store)


def test_truncated_and_missing_files_are_named(store):
    key = "select-0123456789ab"
    _image_set(store, key)
    png = _raw(store, key, image_name(0))
    _overwrite(store, key, image_name(0), png[:-7])
    with pytest.raises(IntegrityError, match=rf"file {image_name(0)} .*expected {len(png):,} bytes.*found {len(png) - 7:,} bytes"):
        load_image_set(store, key)
    _overwrite(store, key, image_name(0), png + b"extra")
    with pytest.raises(IntegrityError, match=rf"found more than {len(png):,} bytes"):
        store.get_bytes(key, image_name(0))
    _overwrite(store, key, image_name(0), png)
    assert store.get_bytes(key, image_name(0)) == png
    if store.uri.startswith("s3://"):
        s3, bucket, prefix = _s3(store.uri)
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/{key}/index.parquet")
    else:
        (store.root / key / "index.parquet").unlink()
    with pytest.raises(IntegrityError, match="file index.parquet is listed in its manifest but missing"):
        load_image_set(store, key)
    with pytest.raises(StoreError, match="lists no file 'extra.bin'"):
        store.get_bytes(key, "extra.bin")


def test_an_unfinished_artifact_reads_unverified_and_a_remade_one_is_believed(store):
    """A stage reads its own files before finalize (no manifest yet); and an artifact removed and
    re-made by another process is read against its new manifest, not this process's cached one."""
    key = "teachers-0123456789ab"
    store.put_bytes(key, "epochs/epoch_001.json", b'{"epoch": 1}')
    assert store.get_bytes(key, "epochs/epoch_001.json") == b'{"epoch": 1}'
    store.finalize(key, "teachers", {})
    assert store.get_bytes(key, "epochs/epoch_001.json") == b'{"epoch": 1}'  # manifest now cached
    other = open_store(store.uri)  # "another process": same store, its own writes
    other.remove_folder(key)
    other.put_bytes(key, "epochs/epoch_001.json", b'{"epoch": 1, "again": true}')
    other.finalize(key, "teachers", {})
    assert store.get_bytes(key, "epochs/epoch_001.json") == b'{"epoch": 1, "again": true}'


def test_local_download_is_verified_once_then_stamped(file_store_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache"))
    store = open_store(file_store_uri)
    key = "transfer-0123456789ab"
    store.put_bytes(key, "adapter.safetensors", os.urandom(1 << 20))
    store.put_bytes(key, "adapter.json", b"{}")
    store.finalize(key, "transfer", {})
    reads = []
    real = store._chunks
    monkeypatch.setattr(store, "_chunks", lambda rel, *a: (reads.append(rel), real(rel, *a))[1])
    assert store.download(key) == store.root / key
    assert sorted(reads) == [f"{key}/adapter.json", f"{key}/adapter.safetensors"]
    assert store.download(key) == store.root / key and len(reads) == 2, "an unchanged folder was re-hashed"
    stamp = store.cache_dir(key).parent / f"{key}.verified.json"
    assert stamp.is_file() and not store.cache_dir(key).exists(), "a local store copies nothing"
    _flip(store, key, "adapter.safetensors")
    with pytest.raises(IntegrityError, match="file adapter.safetensors does not match"):
        store.download(key)
    assert not stamp.exists()


# ---------------------------------------------------------------------------------------------
# hostile names and pickles


@pytest.mark.parametrize("hostile", ["../../escaped.txt", "/tmp/absolute.txt", "a/../../b.txt"])
def test_a_hostile_manifest_name_is_refused_on_every_read(store, hostile):
    key = "transfer-0123456789ab"
    store.put_bytes(key, "adapter.json", b"{}")
    store.finalize(key, "transfer", {})
    manifest = json.loads(_raw(store, key, MANIFEST))
    manifest["files"].append({"name": hostile, "size": 4, "sha256": "0" * 64})
    _overwrite(store, key, MANIFEST, json.dumps(manifest).encode())
    store.forget(key)  # a fresh process would read the new manifest
    for read in (store.manifest, store.download, lambda k: store.get_bytes(k, "adapter.json")):
        with pytest.raises(StoreError, match=f"refusing the manifest: .*invalid file name {hostile!r}"):
            read(key)


@pytest.mark.parametrize("hostile", ["../escaped.txt", "/absolute.txt", "a/../../b.txt"])
def test_a_hostile_s3_listing_is_refused_by_name(s3_bucket, hostile):
    """An object whose name under the artifact is '../x' or '/x' is refused when the artifact is
    listed (and so never finalized into a manifest, never downloaded)."""
    store = open_store(s3_bucket)
    key = "select-0123456789ab"
    store.put_bytes(key, "good.bin", b"ok")
    s3, bucket, prefix = _s3(s3_bucket)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}/{hostile}", Body=b"evil")
    assert any(o["Key"].endswith(hostile) for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    for call in (store.list_files, lambda k: store.finalize(k, "select", {})):
        with pytest.raises(StoreError, match=f"refusing object s3://{bucket}/.*invalid file name {hostile!r}"):
            call(key)
    assert not store.exists(key)


def test_a_local_listing_name_with_backslashes_is_refused(file_store_uri):
    store = open_store(file_store_uri)
    key = "select-0123456789ab"
    store.put_bytes(key, "good.bin", b"ok")
    (store.root / key / "x\\..\\..\\y").write_bytes(b"evil")
    with pytest.raises(StoreError, match=r"invalid file name 'x\\\\..\\\\..\\\\y'"):
        store.finalize(key, "select", {})


class _RunsCode:
    """Unpickling this runs a shell command (creates ``marker``): what a hostile bucket writer plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_by_the_checkpoint_loaders(store, tmp_path):
    """Through the real loaders: the teachers artifact's checkpoints (load_state, the ensemble) and
    the Ray Train checkpoints teachers and transfer resume from (launcher.load_checkpoint)."""
    from ray.train import Checkpoint

    from hello_ray.stages import teachers, transfer

    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"model": _RunsCode(marker), "epoch": 1}, evil)
    key = "teachers-0123456789ab"
    _teachers(store, key, planted=evil.getvalue())  # write access to the bucket: manifest matches
    for load in (lambda: load_state(store, key, epoch_file(1)),
                 lambda: TeacherEnsemble.from_trajectory(store, key, "1-2", 2)):
        with pytest.raises(StoreError, match=rf"{epoch_file(1)}: refusing to load it: .*the Python global posix.system. Nothing of it was run"):
            load()
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    for name in (teachers.CHECKPOINT_FILE, transfer.CHECKPOINT_FILE):
        (ckpt_dir / name).write_bytes(evil.getvalue())
        with pytest.raises(StoreError, match=rf"Ray checkpoint {name} of {key} .*refusing to load it"):
            launcher.load_checkpoint(Checkpoint.from_directory(str(ckpt_dir)), name, key)
    assert not marker.exists(), "the pickle ran code"


# ---------------------------------------------------------------------------------------------
# durability and reuse


def test_local_finalize_fsyncs_files_and_folders_before_the_manifest(file_store_uri, monkeypatch):
    """A power loss cannot be injected in a test: the real os.fsync is wrapped to record which
    file or folder each call made durable, and in which order."""
    store = open_store(file_store_uri)
    key = "select-0123456789ab"
    for name in ("images/00000.png", "images/deep/00001.png", "index.parquet"):
        store.put_bytes(key, name, b"x" * 10)
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.finalize(key, "select", {})
    base = store.root / key
    manifest_tmp = [i for i, p in enumerate(synced) if MANIFEST in p and p.endswith(".partial")]
    assert len(manifest_tmp) == 1, synced
    before, after = synced[:manifest_tmp[0]], synced[manifest_tmp[0] + 1:]
    for path in (base / "images/00000.png", base / "images/deep/00001.png", base / "index.parquet",
                 base / "images/deep", base / "images", base, store.root):
        assert str(path) in before, (path, synced)
    assert after == [str(base)], "the manifest's folder must be synced after its rename"


def _stage(name: str = "demo") -> types.SimpleNamespace:
    """The part of a stage module that Run.needs reads."""
    return types.SimpleNamespace(STAGE=name, INPUTS=(), stage_config=lambda cfg: {"x": 1})


def test_reuse_refuses_another_format_and_warns_once_on_other_versions(store, caplog, monkeypatch):
    import hello_ray.store as store_mod
    import hello_ray.store.base  # noqa: F401 (store_mod.base)
    import hello_ray.store.s3  # noqa: F401 (store_mod.s3)
    from hello_ray.config import load_config
    from hello_ray.pipeline import Run

    monkeypatch.setattr(store_mod.base, "_WARNED_VERSIONS", set())  # "once" is per process

    cfg = load_config("smoke", overrides=[f"store={store.uri}"])
    stage = _stage()
    key = store.artifact_key("demo", {"x": 1}, {})
    store.put_bytes(key, "out.bin", b"1")
    store.finalize(key, "demo", {"x": 1})
    manifest = json.loads(_raw(store, key, MANIFEST))
    old = {**manifest, "versions": {**manifest["versions"], "torch": "1.0.0"}}
    _overwrite(store, key, MANIFEST, json.dumps(old).encode())
    store.forget(key)
    with caplog.at_level(logging.WARNING, logger="hello_ray.store"):
        assert Run(cfg, store).needs(stage, {}) is False
        assert Run(cfg, store).needs(stage, {}) is False
    warned = [r.getMessage() for r in caplog.records if "other library versions" in r.getMessage()]
    assert len(warned) == 1 and f"torch 1.0.0 -> {store_mod.library_versions()['torch']}" in warned[0], warned

    _overwrite(store, key, MANIFEST, json.dumps({**manifest, "format": FORMAT_VERSION + 1}).encode())
    store.forget(key)
    with pytest.raises(StoreError, match=rf"artifact {key} .*format {FORMAT_VERSION + 1}, but this hello_ray "
                       rf"reads format {FORMAT_VERSION}.*hello-ray rm {key}"):
        Run(cfg, store).needs(stage, {})


# ---------------------------------------------------------------------------------------------
# hello-ray ls / rm / gc


def _run_state(store, key: str) -> None:
    """Ray Train run state under _ray/<key> (a checkpoint file is enough for what rm/gc see)."""
    if store.uri.startswith("s3://"):
        s3, bucket, prefix = _s3(store.uri)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{RAY_DIR}/{key}/checkpoint_000/state.pt", Body=b"ck")
    else:
        path = store.root / RAY_DIR / key / "checkpoint_000" / "state.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"ck")


def _lease(store, key: str, expires: float) -> None:
    """The lease object the writer-lease code writes (read side: lease.read_lease)."""
    store._write(f"{LEASE_DIR}/{key}.json", json.dumps(
        {"owner": "test", "host": "here", "pid": os.getpid(), "expires": expires, "stage": "transfer"}).encode())


def test_ls_rm_gc(store, capsys, monkeypatch):
    import hello_ray.store as store_mod
    import hello_ray.store.base  # noqa: F401 (store_mod.base)
    import hello_ray.store.s3  # noqa: F401 (store_mod.s3)

    monkeypatch.setattr(store_mod.s3, "_DELETE_BATCH", 3)  # several DeleteObjects rounds on S3
    done, half, leased, orphan = ("teachers-aaaaaaaaaaaa", "select-bbbbbbbbbbbb",
                                  "transfer-cccccccccccc", "evaluate-dddddddddddd")
    _teachers(store, done)
    _run_state(store, done)
    store.download(done)                               # a local copy (S3) / a verified stamp
    for i in range(4):
        store.put_bytes(half, f"images/{i:05d}.png", b"p" * 100)
    store.put_bytes(leased, "adapter.json", b"{}")
    _run_state(store, leased)
    _lease(store, leased, time.time() + 86400)
    _run_state(store, orphan)

    assert cli.main(["ls", "--store", store.uri]) == 0
    out = capsys.readouterr().out
    table, footer = out.split("\n\n")
    rows = {line.split()[1]: line.split() for line in table.splitlines()[2:]}  # after header and rule
    assert rows[done][:3] == ["teachers", done, "yes"] and rows[done][3] == "3" and "ray run state" in out
    assert rows[half][2:4] == ["no", "4"] and rows[leased][2] == "no" and "leased (host here pid" in out
    assert rows[orphan][2] == "no" and "no folder" in out
    assert set(rows) == {done, half, leased, orphan} and footer.startswith("4 keys")

    # gc: nothing is old enough yet; two hours later everything not leased goes.
    assert all(line.startswith("kept") for line in collect(store))
    lines = collect(store, min_age_s=3600, now=time.time() + 7200)
    assert any(half in line and line.startswith("removed unfinished") for line in lines), lines
    assert any(f"{RAY_DIR}/{done}" in line for line in lines) and any(f"{RAY_DIR}/{orphan}" in line for line in lines)
    assert any(line.startswith(f"kept {leased}: under an active writer lease") for line in lines)
    keys = {e.key: e for e in list_entries(store)}
    assert set(keys) == {done, leased} and not keys[done].ray_state and keys[leased].ray_state
    assert store.exists(done) and store.download(done)  # the finished artifact is untouched

    # rm refuses a leased key, then removes it with --force (folder and run state).
    assert cli.main(["rm", leased, "--store", store.uri]) == 1
    assert "is being written right now" in capsys.readouterr().err
    assert cli.main(["rm", leased, "--store", store.uri, "--force"]) == 0
    # rm of the finished one: folder, run state and this machine's cache.
    _run_state(store, done)
    cache = store.cache_dir(done).parent
    assert cli.main(["rm", done, "--store", store.uri]) == 0
    out = capsys.readouterr().out
    assert f"Ray run state {store.uri}/{RAY_DIR}/{done}" in out and "download cache" in out
    assert not store.exists(done) and list_entries(store) == []
    assert not any(p.name.startswith(done) for p in cache.iterdir())
    assert cli.main(["rm", done, "--store", store.uri]) == 1
    assert f"nothing named {done}" in capsys.readouterr().err
    assert cli.main(["rm", RAY_DIR, "--store", store.uri]) == 1


def test_gc_collects_stale_download_caches(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache"))
    store = open_store(s3_bucket)
    gone, kept = "teachers-aaaaaaaaaaaa", "select-bbbbbbbbbbbb"
    for key in (gone, kept):
        store.put_bytes(key, "x.bin", b"x")
        store.finalize(key, key.split("-")[0], {})
        store.download(key)
    store.remove_folder(gone)          # removed by another machine: this one's copy is stale
    lines = collect(store, min_age_s=0)
    assert lines == [f"removed this machine's download cache of {gone} ({store.cache_folder()})"], lines
    assert not store.cache_dir(gone).exists() and store.cache_dir(kept).is_dir()
