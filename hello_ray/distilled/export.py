"""``hello-ray export``: a finished run's distilled set as a self-contained package.

    hello-ray export <evaluate key> --store <the run's store> --to <local path | s3://bucket/prefix/name>
                     [--labels projector,stored] [--overwrite]

Reads the evaluate artifact's manifest for its inputs (images, teachers, transfer), copies the image
set's PNGs byte for byte into class folders, the transfer artifact's adapter files, optionally the
stored labels evaluate replayed, renders the dataset card (hello_ray/distilled/card.py), and writes
the manifest last (``Store.finalize``), so a half-written package is never taken for a finished one.
Both sides go through the store layer: reads are verified against the run's manifests, S3 works
for either. The layout is hello_ray/formats/package.py.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from typing import Any

from hello_ray.data.imageset import image_name, read_image_set_info
from hello_ray.distilled.package import open_package_store
from hello_ray.formats import package as fmt
from hello_ray.models.adapter import ADAPTER_JSON, ADAPTER_WEIGHTS
from hello_ray.store import MANIFEST, Store, StoreError, library_versions, open_store

log = logging.getLogger(__name__)


class ExportError(StoreError):
    """The export cannot start or finish (names the key, the destination, and what to do)."""


def parse_labels(spec: str) -> list[str]:
    """``projector,stored`` -> ["projector", "stored"] (known kinds, no repeats)."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in fmt.LABEL_KINDS]
    if bad or len(set(kinds)) != len(kinds):
        raise ExportError(f"--labels {spec!r}: give a comma-separated subset of {', '.join(fmt.LABEL_KINDS)} "
                          "(class ids always ship as the class folders)")
    return kinds


def _source_keys(src: Store, evaluate_key: str) -> tuple[dict, dict[str, str]]:
    manifest = src.manifest(evaluate_key)        # ArtifactNotFound names key and store
    if manifest.get("stage") != "evaluate":
        raise ExportError(f"artifact {evaluate_key} in {src.uri} is a {manifest.get('stage')!r} artifact; "
                          "export takes an evaluate artifact key (hello-ray ls --stage evaluate)")
    inputs = dict(manifest.get("inputs") or {})
    missing = [r for r in ("images", "transfer") if r not in inputs]
    if missing:
        raise ExportError(f"evaluate artifact {evaluate_key}: its manifest records no {missing} input")
    return manifest, inputs


def _prepare_destination(dst: Store, key: str, overwrite: bool) -> None:
    """Refuse a destination that holds anything, unless ``overwrite`` (then empty it, manifest first)."""
    present = dst.folder_files(key)
    if present and not overwrite:
        raise ExportError(f"destination {dst.uri_for(key)} is not empty ({len(present)} files); "
                          "choose a new destination or pass --overwrite to replace it")
    if present:
        dst.remove_folder(key)
        log.info("export: removed %d files of the old %s", len(present), dst.uri_for(key))


def export(evaluate_key: str, store_uri: str, to: str, labels: list[str] | None = None,
           overwrite: bool = False, endpoint_url: str | None = None) -> dict[str, Any]:
    """Write the package of evaluate artifact ``evaluate_key`` (in ``store_uri``) to ``to``.

    Returns {"uri", "files", "bytes": {kind: bytes}}; the package's manifest is written last.
    """
    from hello_ray.distilled.card import render_card

    labels = ["projector"] if labels is None else list(labels)
    t0 = time.perf_counter()
    src = open_store(store_uri, endpoint_url)
    manifest, inputs = _source_keys(src, evaluate_key)
    images_key, transfer_key = inputs["images"], inputs["transfer"]
    # What --labels asks for must exist before anything is written (or an old package removed).
    adapter_files = _adapter_files(src, transfer_key) if "projector" in labels else []
    stored_files = _stored_files(src, evaluate_key) if "stored" in labels else []
    dst, key = open_package_store(to, endpoint_url)
    if dst.uri == src.uri and key in (evaluate_key, *inputs.values()):
        raise ExportError(f"--to {to}: that is an artifact of the run itself; export to a new folder")
    _prepare_destination(dst, key, overwrite)

    info = read_image_set_info(src, images_key)
    class_names, set_labels = list(info["class_names"]), [int(x) for x in info["labels"]]
    classes = fmt.classes_doc(class_names)
    folders = classes["folders"]

    def copy_image(i: int) -> None:
        dst.put_bytes(key, fmt.image_file(folders[set_labels[i]], i), src.get_bytes(images_key, image_name(i)))

    # The PNGs go across unchanged (byte for byte: the pixels evaluate trained on); many small
    # objects, so in parallel (S3 GETs and PUTs release the GIL).
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(copy_image, range(len(set_labels))))
    dst.put_bytes(key, fmt.CLASSES_JSON, _json_bytes(classes))

    doc: dict[str, Any] = {
        "format": fmt.PACKAGE_FORMAT, "num_images": len(set_labels), "num_classes": len(class_names),
        "image_size": int(info["image_size"]), "image_source": info.get("image_source", "rded"),
        "refined": "refine" in info, "images": "uint8 RGB PNG, images/<class folder>/<index>.png",
        "labels": ["hard"] + labels,
        "source": {"store": src.uri, "evaluate": evaluate_key, **inputs,
                   "images_parent": info.get("parent") if "refine" in info else None},
        "versions": library_versions(),
    }
    if "projector" in labels:
        doc["projector"] = _copy_adapter(src, transfer_key, adapter_files, dst, key, manifest)
    if "stored" in labels:
        doc["stored"] = _copy_stored(src, evaluate_key, stored_files, dst, key)
    dst.put_bytes(key, fmt.PACKAGE_JSON, _json_bytes(doc))

    card, pngs = render_card(src, evaluate_key, manifest, doc, class_names, package_uri=dst.uri_for(key))
    for name, data in pngs.items():
        dst.put_bytes(key, name, data)
    dst.put_bytes(key, fmt.CARD, card.encode())
    sizes = package_sizes(dst, key)
    final = dst.finalize(key, fmt.PACKAGE_STAGE, {"labels": doc["labels"]},
                         {"evaluate": evaluate_key, **inputs}, {"bytes": sizes})
    sizes["manifest"] = int(dst.folder_files(key)[MANIFEST][0])
    log.info("export: %s -> %s in %.1f s (%d files)", evaluate_key, dst.uri_for(key),
             time.perf_counter() - t0, len(final["files"]))
    return {"uri": dst.uri_for(key), "files": len(final["files"]), "bytes": sizes}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode()


def _adapter_files(src: Store, transfer_key: str) -> list[str]:
    names = [f for f in src.list_files(transfer_key) if f.startswith("adapter.")]
    if ADAPTER_JSON not in names or ADAPTER_WEIGHTS not in names:
        raise ExportError(f"transfer artifact {transfer_key}: no adapter.json + adapter.safetensors to ship "
                          f"(found {names})")
    return names


def _stored_files(src: Store, evaluate_key: str) -> list[str]:
    """Every ``labels/stored[-N]/`` file of the evaluate artifact (not the floor's controls)."""
    names = [f for f in src.list_files(evaluate_key)
             if f.startswith(f"{fmt.LABELS_DIR}/stored/") or f.startswith(f"{fmt.LABELS_DIR}/stored-")]
    if not names:
        raise ExportError(f"evaluate artifact {evaluate_key}: no stored labels (labels/stored*/) to ship; "
                          "its run had no stored strategy: export without 'stored' in --labels")
    return names


def _copy_adapter(src: Store, transfer_key: str, names: list[str], dst: Store, key: str,
                  evaluate_manifest: dict) -> dict[str, Any]:
    """The transfer artifact's adapter files, and what the receiver needs to rebuild the labeller
    exactly as evaluate did (image size, label precision, the CLIP weights' identity)."""
    from hello_ray.models.clip import pretrained_identity

    nbytes = 0
    for n in names:
        data = src.get_bytes(transfer_key, n)
        nbytes += len(data)
        dst.put_bytes(key, f"{fmt.ADAPTER_DIR}/{n}", data)
    meta = json.loads(src.get_bytes(transfer_key, ADAPTER_JSON))
    ev = (evaluate_manifest.get("config") or {}).get("evaluate") or {}
    data = (evaluate_manifest.get("config") or {}).get("data") or {}
    return {"files": sorted(names), "bytes": nbytes, "model": meta["model"], "pretrained": meta["pretrained"],
            "pretrained_identity": pretrained_identity(meta["pretrained"]),
            "conv_rank": meta["conv_rank"], "head_rank": meta["head_rank"], "style": meta["style"],
            "dtype": meta["dtype"], "image_size": int(data.get("image_size") or 0) or None,
            "label_precision": ev.get("label_precision", "auto"), "transfer": transfer_key}


def _copy_stored(src: Store, evaluate_key: str, names: list[str], dst: Store, key: str) -> dict[str, Any]:
    sets: dict[str, int] = {}
    for n in names:
        data = src.get_bytes(evaluate_key, n)
        dst.put_bytes(key, n, data)
        folder = n.split("/")[1]
        sets[folder] = sets.get(folder, 0) + len(data)
    return {"sets": sets, "bytes": sum(sets.values())}


def package_sizes(store: Store, key: str) -> dict[str, int]:
    """Bytes per part of a package: images, adapter, stored labels, card, grid PNGs, the JSON files
    (classes, package); the manifest is not counted here (it is written after)."""
    out = {"images": 0, "adapter": 0, "stored": 0, "card": 0, "grid": 0, "json": 0}
    for name, (size, _) in store.folder_files(key).items():
        if name == MANIFEST:
            continue
        part = ("images" if name.startswith(fmt.IMAGES_DIR + "/") else
                "adapter" if name.startswith(fmt.ADAPTER_DIR + "/") else
                "stored" if name.startswith(fmt.LABELS_DIR + "/") else
                "card" if name == fmt.CARD else "grid" if name.endswith(".png") else "json")
        out[part] += int(size)
    return out
