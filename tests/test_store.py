"""Artifact store on a local folder and on a real S3 server (moto), plus Ray Train storage on S3."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from hello_ray.store import (
    ArtifactNotFound,
    S3RetryingFileSystem,
    S3Store,
    StoreError,
    artifact_key,
    open_store,
    resolve_filesystem,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def store_uri(request) -> str:
    """The same tests on a local folder (file://) and on the moto S3 server."""
    return request.getfixturevalue("file_store_uri" if request.param == "file" else "s3_bucket")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


def _objects(uri: str) -> dict[str, bytes]:
    """All objects under an s3:// store URI, read with plain boto3 (as a user would)."""
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------
# keys


def test_artifact_key_is_deterministic_and_sensitive():
    cfg = {"epochs": 3, "lr": 0.1, "model": "resnet18", "nested": {"b": [1, 2], "a": None}}
    same = {"nested": {"a": None, "b": [1, 2]}, "model": "resnet18", "lr": 0.1, "epochs": 3}
    key = artifact_key("teachers", cfg, {"data": "demo-0123456789ab"})
    assert key == artifact_key("teachers", same, {"data": "demo-0123456789ab"})
    assert key.startswith("teachers-") and len(key) == len("teachers-") + 12
    assert key != artifact_key("teachers", {**cfg, "lr": 0.2}, {"data": "demo-0123456789ab"})
    assert key != artifact_key("teachers", cfg, {"data": "demo-ffffffffffff"})
    assert key != artifact_key("teachers", cfg)
    assert key.split("-")[1] != artifact_key("select", cfg, {"data": "demo-0123456789ab"}).split("-")[1]
    # Pinned: a change here silently orphans every stored artifact (bump FORMAT_VERSION instead).
    assert artifact_key("demo", {"a": 1}) == "demo-" + hashlib.sha256(
        b'{"config":{"a":1},"format":1,"inputs":{},"stage":"demo"}').hexdigest()[:12]
    with pytest.raises(StoreError, match="stage 'teachers'"):
        artifact_key("teachers", {"fn": object()})
    with pytest.raises(StoreError, match="stage name"):
        artifact_key("bad/stage", cfg)


def test_key_derivation_survives_a_new_process():
    code = "from hello_ray.store import artifact_key; print(artifact_key('x', {'b': 1.5, 'a': [1, 'z']}, {'i': 'k'}))"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == artifact_key("x", {"a": [1, "z"], "b": 1.5}, {"i": "k"})


# ---------------------------------------------------------------------------------------------
# write / read / list / skip


def test_write_read_list_finalize(store_uri, tmp_path):
    store = open_store(store_uri)
    cfg, inputs = {"epochs": 2}, {"teachers": "teachers-000000000000"}
    key = store.artifact_key("select", cfg, inputs)
    (tmp_path / "d" / "deep").mkdir(parents=True)
    (tmp_path / "d" / "x.txt").write_text("x")
    (tmp_path / "d" / "deep" / "y.txt").write_text("yy")
    (tmp_path / "f.bin").write_bytes(b"\x00" * 3000)

    store.put_bytes(key, "images/00000.png", b"png0")
    store.put_file(key, "f.bin", tmp_path / "f.bin")
    store.put_dir(key, tmp_path / "d", prefix="extra")
    assert not store.exists(key), "visible before its manifest"
    assert key not in store.list_artifacts()
    assert store.list_files(key) == ["extra/deep/y.txt", "extra/x.txt", "f.bin", "images/00000.png"]
    assert store.get_bytes(key, "extra/deep/y.txt") == b"yy"

    manifest = store.finalize(key, "select", cfg, inputs, summary={"n": 1})
    assert store.exists(key) and store.manifest(key) == manifest
    assert manifest["key"] == key and manifest["stage"] == "select"
    assert manifest["config"] == cfg and manifest["inputs"] == inputs and manifest["summary"] == {"n": 1}
    files = {f["name"]: f for f in manifest["files"]}
    assert set(files) == set(store.list_files(key))
    assert files["f.bin"] == {"name": "f.bin", "size": 3000,
                              "sha256": hashlib.sha256(b"\x00" * 3000).hexdigest()}
    assert files["images/00000.png"]["sha256"] == hashlib.sha256(b"png0").hexdigest()
    assert {"python", "torch", "ray", "pyarrow"} <= set(manifest["versions"])
    assert manifest["created"].endswith("+00:00")

    other = store.artifact_key("teachers", {"epochs": 1})
    store.put_bytes(other, "trajectory.json", b"{}")
    store.finalize(other, "teachers", {"epochs": 1})
    assert store.list_artifacts() == sorted([key, other])
    assert store.list_artifacts("select") == [key] and store.list_artifacts("evaluate") == []
    assert store.uri_for(key, "f.bin").startswith(store.uri) and store.uri_for(key, "f.bin").endswith(f"/{key}/f.bin")


def test_same_config_is_skipped(store_uri):
    """What pipeline.run_stage does: the second run with the same config finds the key and skips."""
    store = open_store(store_uri)
    runs = []

    def run_stage(cfg: dict) -> str:
        key = store.artifact_key("teachers", cfg)
        if not store.exists(key):
            runs.append(cfg)
            store.put_bytes(key, "result.txt", repr(cfg).encode())
            store.finalize(key, "teachers", cfg)
        return key

    k1 = run_stage({"epochs": 2})
    assert run_stage({"epochs": 2}) == k1 and len(runs) == 1
    # A fresh handle (another job later) sees it too.
    assert open_store(store_uri).exists(k1)
    assert run_stage({"epochs": 3}) != k1 and len(runs) == 2


def test_missing_and_invalid(store_uri):
    store = open_store(store_uri)
    with pytest.raises(ArtifactNotFound, match="select-000000000000"):
        store.manifest("select-000000000000")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("select-000000000000", "nope.bin")
    with pytest.raises(ArtifactNotFound):
        store.download("select-000000000000")
    with pytest.raises(StoreError, match="no data files"):
        store.finalize("select-000000000000", "select", {})
    assert not store.exists("select-000000000000")
    for name in ("../escape", "/abs", "a//b", "manifest.json", ""):
        with pytest.raises(StoreError, match="invalid file name"):
            store.put_bytes("select-000000000000", name, b"x")
    for key in ("a/b", "_ray", "", ".hidden"):
        with pytest.raises(StoreError, match="artifact key"):
            store.exists(key)
    with pytest.raises(StoreError, match="unsupported store scheme"):
        open_store("ftp://host/x")
    # Helper folders ("_" first) hold files but are never artifacts.
    store.put_bytes("_drill-select-000000000000", "fired", b"1")
    assert store.list_files("_drill-select-000000000000") == ["fired"]
    assert store.list_artifacts() == []


def test_local_paths_and_file_uris_are_the_same_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("./artifacts")
    assert rel.uri == (tmp_path / "artifacts").resolve().as_uri()
    assert open_store(rel.uri).uri == rel.uri
    assert rel.ray_storage() == (str((tmp_path / "artifacts" / "_ray").resolve()), None)
    fs, path = resolve_filesystem(rel.uri_for("a-000000000000", "x.bin"))
    assert type(fs).__name__ == "LocalFileSystem" and path.endswith("/artifacts/a-000000000000/x.bin")


# ---------------------------------------------------------------------------------------------
# crashes


KILLED_WRITER = """
import sys, time
from hello_ray.store import open_store
store = open_store(sys.argv[1])
store.put_bytes(sys.argv[2], "data/a.bin", b"a" * 1000)
store.put_bytes(sys.argv[2], "b.bin", b"b" * 2000)
print("wrote", flush=True)
time.sleep(300)  # killed here: data written, manifest not
store.finalize(sys.argv[2], "select", {})
"""


def test_stage_killed_between_data_and_manifest(store_uri):
    store = open_store(store_uri)
    key = store.artifact_key("select", {"ipc": 1})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, store_uri, key], env=_child_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "wrote"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The data is there, but nobody believes it.
    assert store.list_files(key) == ["b.bin", "data/a.bin"]
    assert not store.exists(key) and key not in store.list_artifacts()
    with pytest.raises(ArtifactNotFound, match="stopped before finishing"):
        store.manifest(key)

    # The re-run overwrites the leftovers and finalizes cleanly.
    store.put_bytes(key, "data/a.bin", b"A" * 10)
    store.put_bytes(key, "b.bin", b"B" * 20)
    manifest = store.finalize(key, "select", {"ipc": 1})
    assert store.exists(key) and store.list_artifacts("select") == [key]
    assert {f["name"]: f["size"] for f in manifest["files"]} == {"data/a.bin": 10, "b.bin": 20}
    assert store.get_bytes(key, "data/a.bin") == b"A" * 10


KILLED_MID_WRITE = """
import sys
from hello_ray.store import open_store
store = open_store(sys.argv[1])
for i in range(1, 10_000):
    store.put_bytes(sys.argv[2], "blob.bin", bytes([i % 251]) * (8 << 20))
    print(i, flush=True)
"""


def test_local_writes_are_atomic_when_killed_mid_write(file_store_uri):
    """Killed while overwriting an 8 MiB file: the final name holds a whole file, never a torn one."""
    store = open_store(file_store_uri)
    key = "blob-000000000000"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, file_store_uri, key],
                            env=_child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.03)  # into the next write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    data = store.get_bytes(key, "blob.bin")
    assert len(data) == 8 << 20 and data == data[:1] * len(data)
    assert store.list_files(key) == ["blob.bin"], "a temp file of the killed write was listed"
    store.finalize(key, "blob", {})
    root = Path(store.download(key))
    assert sorted(p.name for p in root.iterdir()) == ["blob.bin", "manifest.json"]


# ---------------------------------------------------------------------------------------------
# S3 specifics


def test_download_caches_and_verifies(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache"))
    store = open_store(s3_bucket)
    key = "teachers-0123456789ab"
    payload = {"epochs/epoch_000.pt": os.urandom(3000), "trajectory.json": b'{"epochs": []}'}
    for name, data in payload.items():
        store.put_bytes(key, name, data)
    store.finalize(key, "teachers", {})

    local = store.download(key)
    assert local.is_relative_to(tmp_path / "cache") and local.name == key
    for name, data in payload.items():
        assert (local / name).read_bytes() == data
    assert json.loads((local / "manifest.json").read_text())["key"] == key

    # Complete and unchanged: reused as it is (not fetched again).
    before = (local / "trajectory.json").stat().st_mtime_ns
    assert store.download(key) == local and (local / "trajectory.json").stat().st_mtime_ns == before
    # A damaged cached file is noticed and fetched again.
    (local / "trajectory.json").write_bytes(b"garbage!!!!!!!")
    assert (store.download(key) / "trajectory.json").read_bytes() == payload["trajectory.json"]

    # The object is changed behind the store's back: the download refuses it.
    bucket, prefix = s3_bucket[len("s3://"):].split("/", 1)
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).put_object(
        Bucket=bucket, Key=f"{prefix}/{key}/epochs/epoch_000.pt", Body=os.urandom(3000))
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "fresh"))
    with pytest.raises(StoreError, match=rf"artifact {key}: file epochs/epoch_000\.pt does not match its "
                       rf"manifest: .*hello-ray rm {key} --store {s3_bucket}"):
        store.download(key)
    assert not list((tmp_path / "fresh").rglob("epoch_000.pt*")), "a rejected file was kept"


@pytest.mark.parametrize("hostile", ["../../escaped.txt", "/tmp/absolute.txt", "a/../../b.txt", "x\\..\\..\\y"])
def test_a_hostile_manifest_name_is_refused_before_it_touches_a_path(s3_bucket, tmp_path, monkeypatch, hostile):
    """A manifest in the bucket names a file outside the artifact (with a matching object): the
    download refuses it, naming it, and writes nothing outside the cache folder."""
    monkeypatch.setenv("HELLO_RAY_CACHE", str(tmp_path / "cache" / "deep"))
    store = open_store(s3_bucket)
    key = "transfer-0123456789ab"
    store.put_bytes(key, "adapter.json", b"{}")
    store.finalize(key, "transfer", {})
    bucket, prefix = s3_bucket[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}/manifest.json")["Body"].read())
    manifest["files"].append({"name": hostile, "size": 4, "sha256": hashlib.sha256(b"evil").hexdigest()})
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}/manifest.json", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}/{hostile}", Body=b"evil")
    with pytest.raises(StoreError, match=re.escape(repr(hostile))):
        store.download(key)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"evil"]
    assert not written and not (tmp_path / "escaped.txt").exists() and not os.path.exists("/tmp/absolute.txt")


def test_credentials_never_in_manifest_or_errors(s3_server, s3_bucket, monkeypatch):
    access, secret = "AKIAHELLORAYTEST0042", "hello-ray-very-secret-key-4242"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(s3_bucket)
    key = store.artifact_key("transfer", {"rank": 4})
    store.put_bytes(key, "adapter.safetensors", b"\x01" * 64)
    store.finalize(key, "transfer", {"rank": 4}, summary={"fidelity": 0.5})
    raw = _objects(s3_bucket)[f"{key}/manifest.json"].decode()
    assert access not in raw and secret not in raw
    assert secret not in repr(store) and secret not in repr(store.ray_storage())
    with pytest.raises(StoreError) as err:
        open_store("s3://no-such-bucket-hello/x")
    assert "no-such-bucket-hello" in str(err.value) and "does not exist" in str(err.value)
    assert access not in str(err.value) and secret not in str(err.value)


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHELLORAYTEST0042")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hello-ray-very-secret-key-4242")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        open_store("s3://bucket/prefix", endpoint_url=endpoint)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "s3://bucket/prefix" in msg and endpoint in msg and "AWS_ENDPOINT_URL_S3" in msg
    assert "hello-ray-very-secret" not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no botocore traceback


def test_missing_credentials_say_what_to_set(s3_bucket, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials found.*AWS_ACCESS_KEY_ID"):
        open_store(s3_bucket)


def test_endpoint_precedence(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic.invalid:1")
    assert open_store(s3_bucket).endpoint_url == s3_server  # AWS_ENDPOINT_URL_S3 wins
    assert open_store(s3_bucket, endpoint_url="http://arg.invalid:1", check=False).endpoint_url == \
        "http://arg.invalid:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    store = open_store(s3_bucket)  # reaches moto through the generic variable alone
    store.put_bytes("x-000000000000", "a.txt", b"a")
    assert store.get_bytes("x-000000000000", "a.txt") == b"a"


def test_resolve_filesystem_on_s3(s3_bucket):
    import pyarrow.fs as pafs

    store = open_store(s3_bucket)
    store.put_bytes("data-000000000000", "train/part-0.bin", b"abc")
    fs, path = resolve_filesystem(store.uri_for("data-000000000000", "train"))
    assert isinstance(fs, pafs.S3FileSystem) and path == s3_bucket[len("s3://"):] + "/data-000000000000/train"
    infos = fs.get_file_info(pafs.FileSelector(path))
    assert [i.base_name for i in infos] == ["part-0.bin"]
    with fs.open_input_stream(infos[0].path) as f:
        assert f.read() == b"abc"


# ---------------------------------------------------------------------------------------------
# Ray


def test_store_travels_to_ray_workers(ray_local, store_uri):
    """A Ray task receives the pickled store and reads/writes the same artifacts (no client pickled)."""
    store = open_store(store_uri)
    store.put_bytes("w-000000000000", "in.txt", b"hello")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get_bytes("w-000000000000", "in.txt") == b"hello"

    @ray_local.remote(num_cpus=0.5)
    def shout(s) -> str:
        s.put_bytes("w-000000000000", "out.txt", s.get_bytes("w-000000000000", "in.txt").upper())
        return s.uri

    assert ray_local.get(shout.remote(store)) == store.uri
    assert store.get_bytes("w-000000000000", "out.txt") == b"HELLO"


def test_pickles_carry_endpoint_and_retries_but_no_credentials(s3_bucket, monkeypatch):
    """What reaches Ray workers (the store, Train's storage filesystem, a dataset filesystem)
    holds no key: each process resolves credentials from its own chain."""
    access, secret, token = "AKIAHELLORAYPICKLE42", "hello-ray-pickled-secret-4242", "hello-ray-token-4242"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    store = open_store(s3_bucket, timeout=7, max_attempts=5)
    store.put_bytes("p-000000000000", "a.txt", b"a")  # a live client (with resolved keys) exists
    _, storage_fs = store.ray_storage()
    data_fs, _ = resolve_filesystem(store.uri_for("p-000000000000"), timeout=7, max_attempts=5)
    for obj in (store, storage_fs, data_fs):
        blob = pickle.dumps(obj)
        assert access.encode() not in blob and secret.encode() not in blob and token.encode() not in blob
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.endpoint_url, copy.timeout, copy.max_attempts) == (store.endpoint_url, 7.0, 5)
    assert copy.get_bytes("p-000000000000", "a.txt") == b"a"  # resolved its own credentials
    fs = pickle.loads(pickle.dumps(storage_fs))
    assert isinstance(fs, S3RetryingFileSystem) and fs.max_attempts == 5  # pyarrow's pickle drops it
    assert fs.__reduce__()[1][0]["request_timeout"] == 7.0


_CREDENTIAL_PROCESS = """import datetime, json, sys
open(sys.argv[1], "a").write("x")
end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
print(json.dumps({"Version": 1, "AccessKeyId": "AKIAREFRESHED000042", "SecretAccessKey": "refreshed",
                  "SessionToken": "refreshed-token", "Expiration": end.isoformat()}))
"""


def test_workers_resolve_their_own_refreshable_credentials(ray_local, s3_bucket, tmp_path):
    """A worker without any key in its environment, whose profile gets short-lived credentials
    from a credential_process (as SSO, web identity and instance roles give): boto3 and pyarrow
    in the worker reach the store with them, and boto3 refreshes them as they near expiry."""
    script, calls = tmp_path / "creds.py", tmp_path / "calls"
    script.write_text(_CREDENTIAL_PROCESS)
    config = tmp_path / "config"
    config.write_text(f"[profile rotating]\ncredential_process = {sys.executable} {script} {calls}\n")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
           "AWS_PROFILE": "rotating", "AWS_CONFIG_FILE": str(config),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    store = open_store(s3_bucket)
    store.put_bytes("r-000000000000", "in.txt", b"rotating")
    _, fs = store.ray_storage()

    @ray_local.remote(num_cpus=0.5)
    def use(s, f, path: str) -> tuple[bytes, int, bytes, int, str | None]:
        import boto3

        got = [s.get_bytes("r-000000000000", "in.txt") for _ in range(3)]
        after_boto3 = len(calls.read_text())
        with f.open_input_stream(path) as stream:
            via_pyarrow = stream.read()
        after_pyarrow = len(calls.read_text())
        return got[-1], after_boto3, via_pyarrow, after_pyarrow, \
            boto3.session.Session().get_credentials().method

    path = f"{store.bucket}/{store._obj('r-000000000000/in.txt')}"
    data, after_boto3, via_pyarrow, after_pyarrow, method = ray_local.get(
        use.options(runtime_env={"env_vars": env}).remote(store, fs, path))
    assert data == via_pyarrow == b"rotating"
    assert method == "custom-process"  # refreshable credentials, resolved in the worker
    assert after_boto3 >= 2  # one client, credentials fetched again as they neared expiry
    assert after_pyarrow > after_boto3  # pyarrow resolved its own from the same chain


def _train_loop(config: dict) -> None:
    """Tiny Ray Train loop: resumes from the run's last checkpoint, one checkpoint per epoch."""
    import tempfile

    import ray.train
    import torch
    from ray.train import Checkpoint

    model = torch.nn.Linear(4, 2)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "model.pt"))
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))  # [64, 4]
    y = (x[:, 0] > 0).long()  # [64]
    for epoch in range(start, config["epochs"]):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "epoch": epoch}, os.path.join(d, "model.pt"))
            ray.train.report({"epoch": epoch, "start": start, "loss": loss.item()},
                             checkpoint=Checkpoint.from_directory(d))


def test_ray_train_checkpoints_into_s3_and_resumes(ray_local, s3_bucket):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = open_store(s3_bucket)
    storage_path, fs = store.ray_storage()
    assert storage_path == s3_bucket[len("s3://"):] + "/_ray" and isinstance(store, S3Store)
    name = store.artifact_key("teachers", {"epochs": 2})

    def fit(epochs: int):
        return TorchTrainer(
            _train_loop, train_loop_config={"epochs": epochs},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs),
        ).fit()

    result = fit(2)
    assert result.error is None and result.metrics["epoch"] == 1
    ckpts = sorted(k for k in _objects(s3_bucket) if k.startswith(f"_ray/{name}/") and k.endswith("/model.pt"))
    assert len(ckpts) == 2, ckpts
    assert result.checkpoint.path.startswith(f"{storage_path}/{name}/")

    # Same run name again (a crashed stage re-run): continues from the stored checkpoint.
    resumed = fit(3)
    assert resumed.metrics["start"] == 2 and resumed.metrics["epoch"] == 2
    ckpts = [k for k in _objects(s3_bucket) if k.startswith(f"_ray/{name}/") and k.endswith("/model.pt")]
    assert len(ckpts) == 3, ckpts


def test_checkpoint_files_are_read_straight_from_s3_not_through_a_shared_folder(
        s3_bucket, tmp_path, monkeypatch):
    """A resumed run's workers all load the same Ray checkpoint. Ray's ``as_directory`` downloads a
    remote one into a temporary folder shared by the node's processes, and a process arriving after
    the first download downloads again into it while the first still reads (a torch "file read
    failed" ended a resumed teachers run here). The launcher reads the one file it needs straight
    from the checkpoint's storage: the same bytes, and Ray's download folder is never used."""
    import torch
    from ray.train import Checkpoint

    from hello_ray import launcher

    store = open_store(s3_bucket)
    storage_path, fs = store.ray_storage()
    local = tmp_path / "ckpt"
    local.mkdir()
    state = {"epoch": 3, "w": torch.arange(6.0).view(2, 3)}
    torch.save(state, local / "state.pt")
    (local / "rows.json").write_text('[{"row": 1}]')
    store.upload_ray_dir(local, f"{storage_path}/run/checkpoint_000001")
    checkpoint = Checkpoint(f"{storage_path}/run/checkpoint_000001", filesystem=fs)

    def shared_folder(*args, **kwargs):
        raise AssertionError("went through Ray's shared download folder")
    monkeypatch.setattr(Checkpoint, "to_directory", shared_folder)
    monkeypatch.setattr(Checkpoint, "as_directory", shared_folder)

    assert launcher.checkpoint_bytes(checkpoint, "rows.json") == (local / "rows.json").read_bytes()
    loaded = launcher.load_checkpoint(checkpoint, "state.pt", "teachers-0123")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    with pytest.raises(FileNotFoundError):
        launcher.checkpoint_bytes(checkpoint, "missing.pt")
