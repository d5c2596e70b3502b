"""The Ray Data readers under real S3 faults (moto behind a fault proxy on 127.0.0.1).

The readers are called as the plain callables Ray Data runs (no Ray needed to show what they
emit). An outage longer than pyarrow's own retries hits them mid-shard: they resume where they
were and every row comes out exactly once; an access refusal or a missing object fails at once,
named, without a second request.
"""
from __future__ import annotations

import io
import tarfile
import time
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faults import ThrottlingProxy
from hello_ray.data import readers
from hello_ray.data.errors import DataError
from hello_ray.data.io_retry import is_transient
from hello_ray.data.readers import ReadFiles, ReadParquetShards, ReadTarShards
from hello_ray.store import resolve_filesystem

ATTEMPTS = 2  # per request in pyarrow, and per read in the readers


@pytest.fixture
def proxied(s3_server):
    """(bucket, fault proxy in front of the session's moto server, its pyarrow filesystem)."""
    bucket = f"hr-io-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    proxy = ThrottlingProxy(s3_server, every=0)
    fs, _ = resolve_filesystem(f"s3://{bucket}", proxy.endpoint, timeout=5, max_attempts=ATTEMPTS)
    yield bucket, proxy, fs
    proxy.stop()


def _put(s3_server: str, bucket: str, key: str, data: bytes) -> str:
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=key, Body=data)
    return f"{bucket}/{key}"


def test_parquet_outage_mid_shard_resumes_at_the_row_group(s3_server, proxied):
    bucket, proxy, fs = proxied
    buf = io.BytesIO()
    n = 10
    pq.write_table(pa.table({"image": [bytes([i]) * 5 for i in range(n)], "label": list(range(n))}),
                   buf, row_group_size=2)  # 5 row groups: one batch each
    shard = _put(s3_server, bucket, "train-00000.parquet", buf.getvalue())
    batches = ReadParquetShards(fs, "image", "label")({"shard": np.array([shard], dtype=object)})
    got = [next(batches)]
    # Longer than pyarrow's attempts: the first read of row group 1 fails for good, the reader's
    # second try (a reopened file) gets through.
    proxy.fail_next(ATTEMPTS + 1)
    got += list(batches)
    labels = [int(x) for b in got for x in b["label"]]
    assert labels == list(range(n))  # each row once, in order
    assert [bytes(x) for b in got for x in b["image"]] == [bytes([i]) * 5 for i in range(n)]
    assert proxy.throttled["pyarrow"] == ATTEMPTS + 1 and proxy.retried["pyarrow"] >= 1


def test_tar_outage_mid_stream_rereads_without_emitting_twice(s3_server, proxied, monkeypatch):
    bucket, proxy, fs = proxied
    monkeypatch.setattr(readers, "ROWS_PER_BATCH", 4)
    buf = io.BytesIO()
    n = 12
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, payload in (("png", bytes([i]) * 600), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shard = _put(s3_server, bucket, "train-000000.tar", buf.getvalue())
    batches = ReadTarShards(fs, 3)({"shard": np.array([shard], dtype=object)})
    got = [next(batches)]
    proxy.fail_next(ATTEMPTS + 1)
    got += list(batches)
    ids = [str(x).rsplit(":", 1)[1] for b in got for x in b["id"]]
    assert ids == [f"s{i:03d}" for i in range(n)]  # each sample once, in order
    assert [bytes(x)[0] for b in got for x in b["image"]] == list(range(n))
    assert proxy.throttled["pyarrow"] == ATTEMPTS + 1


def test_file_read_retries_then_succeeds(s3_server, proxied):
    bucket, proxy, fs = proxied
    path = _put(s3_server, bucket, "train/a/x.png", b"png-bytes")
    proxy.fail_next(ATTEMPTS + 1)
    out = ReadFiles(fs)({"path": np.array([path], dtype=object), "label": np.array([0])})
    assert [bytes(x) for x in out["image"]] == [b"png-bytes"]


def test_small_object_throttled_once_is_read(s3_server, proxied):
    """pyarrow does not retry a throttled GET of an object smaller than S3's error body (the AWS
    SDK fails to write the 503's body into the object-sized buffer: INTERNAL_FAILURE, not
    retried); the reader's own retry reads it."""
    bucket, proxy, fs = proxied
    path = _put(s3_server, bucket, "train/a/tiny.png", b"x" * 50)
    with fs.open_input_stream(path) as f:  # pyarrow alone
        proxy.fail_next(1)
        with pytest.raises(OSError, match="INTERNAL_FAILURE"):
            f.read()
    proxy.fail_next(1)
    out = ReadFiles(fs)({"path": np.array([path], dtype=object), "label": np.array([0])})
    assert [bytes(x) for x in out["image"]] == [b"x" * 50]


def test_access_denied_and_missing_objects_fail_at_once_named(s3_server, proxied):
    bucket, proxy, fs = proxied
    path = _put(s3_server, bucket, "train/a/x.png", b"png-bytes")
    reader = ReadFiles(fs)
    proxy.fail_next(1, "AccessDenied")
    before = sum(proxy.seen.values())
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"s3://{bucket}/train/a/x.png: access refused"):
        reader({"path": np.array([path], dtype=object), "label": np.array([0])})
    assert sum(proxy.seen.values()) - before == 1  # not retried
    with pytest.raises(DataError, match=rf"s3://{bucket}/train/a/gone.png: no such file"):
        reader({"path": np.array([f"{bucket}/train/a/gone.png"], dtype=object), "label": np.array([0])})
    assert time.monotonic() - t0 < 3


def test_transient_classification():
    assert is_transient(OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28"))
    assert is_transient(OSError("AWS Error SLOW_DOWN during UploadPart operation"))
    assert is_transient(ConnectionResetError("reset"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation"))
    assert not is_transient(FileNotFoundError("Path does not exist"))
    assert not is_transient(ValueError("AWS Error NETWORK_CONNECTION"))  # not an I/O error
