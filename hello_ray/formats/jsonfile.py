"""JSON files inside artifacts: the one encoding (UTF-8, indent 1), the one decoding error, and the
one "that artifact is not finished" error of the readers."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from hello_ray.store import ArtifactNotFound

if TYPE_CHECKING:
    from hello_ray.store import Store


def write_json(store: "Store", key: str, name: str, data: Any) -> None:
    """``data`` as ``name`` in artifact ``key``."""
    store.put_bytes(key, name, json.dumps(data, indent=1).encode())


def read_json(store: "Store", key: str, name: str) -> Any:
    """The decoded ``name`` of artifact ``key``; a file that is not JSON is a ValueError naming its URI
    (a missing one is the store's ArtifactNotFound)."""
    try:
        return json.loads(store.get_bytes(key, name))
    except json.JSONDecodeError as e:
        raise ValueError(f"{store.uri_for(key, name)} is not valid JSON: {e}") from None


def require_finished(store: "Store", key: str, stage: str) -> None:
    """ArtifactNotFound unless ``key`` has its manifest: a reader never takes a crashed or running
    stage's files for its result."""
    if not store.exists(key):
        raise ArtifactNotFound(f"{stage} artifact {key!r} is not finished in store {store.uri} "
                               f"(no manifest); run the {stage} stage first")
