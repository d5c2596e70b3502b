"""Content hashes of local files, remembered by (path, size, mtime) so a big file is hashed once.

Used where a local file stands in an artifact key (a CLIP weights file as ``transfer.pretrained``):
the key must follow the file's content, not its path, without re-reading gigabytes every run.
The memory is ``cache_root()/file_sha256.json``; a file whose size or modification time changed
is hashed again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hello_ray.store import atomic_write, cache_root

_CACHE_FILE = "file_sha256.json"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """sha256 of the local file ``path``; from the cache while its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache = cache_root() / _CACHE_FILE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, list) and entry[:2] == stamp:
        return str(entry[2])
    digest = _sha256(path)
    known[str(path)] = [*stamp, digest]
    try:  # a cache: a failed write only costs a re-hash next time
        atomic_write(cache, lambda f: f.write(json.dumps(known).encode()))
    except (OSError, RuntimeError):  # RuntimeError: hello_ray.failures.DiskFull
        pass
    return digest
