"""The local-folder backend (``path``, ``file://``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow.fs as pafs

from hello_ray.store.keys import (
    ArtifactNotFound,
    MANIFEST,
    RAY_DIR,
    StoreError,
    _CHUNK,
    _PARTIAL,
    _check_key,
    _check_name,
    _fsync_dir,
    _is_partial,
    _sha256_file,
    atomic_write,
)
from hello_ray.store.base import Store, _NO_MANIFEST, _stamp_ok, _stat


class LocalStore(Store):
    """Artifacts in a local (or network-mounted) folder."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = root.as_uri()

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store folder {self.root}: {e}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store folder {self.root} is not writable")

    def _write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        manifest = rel.endswith(MANIFEST)
        atomic_write(path, lambda f: f.write(data), fsync=manifest)
        if manifest:  # the rename that publishes the manifest must itself survive a power loss
            _fsync_dir(path.parent)

    def _write_file(self, rel: str, path: Path) -> None:
        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)
        atomic_write(self._path(rel), copy)

    def _read(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactNotFound(f"{self._path(rel)} not found") from None

    def _chunks(self, rel: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(rel), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactNotFound(f"{self._path(rel)} not found") from None
        with f:
            while part := f.read(chunk):
                yield part

    def _exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def _list(self, key: str) -> dict[str, int]:
        base = self._path(key)
        out: dict[str, int] = {}
        for dirpath, _, filenames in os.walk(base):
            for fn in filenames:
                name = (Path(dirpath) / fn).relative_to(base).as_posix()
                if name != MANIFEST and not _is_partial(name):
                    try:
                        out[_check_name(key, name)] = (Path(dirpath) / fn).stat().st_size
                    except FileNotFoundError:  # a concurrent writer replaced it; list the rest
                        continue
        return out

    def _children(self, under: str = "") -> list[str]:
        folder = self.root / under if under else self.root
        if not folder.is_dir():
            return []
        return [p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]

    def _tree(self, folder: str) -> dict[str, tuple[int, float]]:
        base = self._path(folder)
        out: dict[str, tuple[int, float]] = {}
        for dirpath, _, filenames in os.walk(base):
            for fn in filenames:
                try:
                    st = (Path(dirpath) / fn).lstat()
                except FileNotFoundError:
                    continue
                out[(Path(dirpath) / fn).relative_to(base).as_posix()] = (st.st_size, st.st_mtime)
        return out

    def _delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def _delete_tree(self, folder: str) -> int:
        path = self._path(folder)
        if not path.is_dir():
            return 0
        n = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path)
        return n

    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        """sha256 of every data file, each fsynced in the same read, then every folder of the
        artifact up to the store root: after a power loss the manifest written next never names
        an empty or missing file."""
        base = self._path(key)
        # Leftover temp files of killed writers are not part of the artifact: tidy them away.
        for p in base.rglob(f".*{_PARTIAL}"):
            p.unlink(missing_ok=True)
        digests = {n: _sha256_file(base / n, fsync=True) for n in files}
        folders = {self.root, base}
        for n in files:
            folders.update(p for p in (base / n).parents if p.is_relative_to(base))
        for folder in sorted(folders, key=lambda p: -len(p.parts)):  # deepest first
            _fsync_dir(folder)
        return digests

    def _manifest_signature(self, key: str) -> Any:
        try:
            st = self._path(f"{key}/{MANIFEST}").stat()
        except (FileNotFoundError, NotADirectoryError):
            return _NO_MANIFEST
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _cache_ident(self) -> str:
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def uri_for(self, key: str, name: str = "") -> str:
        path = self._path(_check_key(key))
        return (path / _check_name(key, name) if name else path).as_uri()

    def download(self, key: str) -> Path:
        """A local artifact is already a local folder: return it once every file matches the
        manifest. The check is streamed once; afterwards sizes and mtimes recorded in a stamp
        under ``cache_root()`` let an unchanged folder through without reading it again."""
        manifest = self._finished(key)
        if manifest is None:
            self.manifest(key)  # raises ArtifactNotFound, saying why
            raise AssertionError("unreachable")
        dest = self._path(key)
        stamp = {"manifest": hashlib.sha256(manifest.raw).hexdigest()}
        with self._cache_lock(key) as stamp_path:
            if _stamp_ok(stamp_path, stamp, dest, manifest.files):
                return dest
            stamp_path.unlink(missing_ok=True)
            stats = {}
            for name, entry in manifest.files.items():
                if (dest / name).is_file():  # stat before reading: a later change re-checks
                    stats[name] = _stat(dest / name)
                self._verify_stream(key, entry)  # a missing file is named here
            stamp["files"] = stats
            atomic_write(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))
        return dest

    def verify(self, key: str) -> None:
        self.download(key)  # checks in place, and stamps the folder so the next check is a stat

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        return str(self.root / RAY_DIR), None
