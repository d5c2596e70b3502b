"""Preflight checks, no compute: would the run start, and could every stage be scheduled?

Each check returns a :class:`Check` (name, status ``ok`` | ``warn`` | ``fail``, a line of detail);
:func:`run_checks` runs them in order and collects the facts later parts need (class count, split
sizes). A failure names what is wrong and where; the run's store keeps nothing of a preflight:
the store probe is written under a ``_preflight-probe-<id>`` helper key and removed, and a local
store folder that the probe had to create is removed again when a check fails.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from hello_ray.config import Config, ConfigError
from hello_ray.preflight.check_report import Check, CheckReport  # noqa: F401 (re-exported)
from hello_ray.preflight.resources import (  # noqa: F401 (re-exported: the resource checks)
    NodeType, check_resources, fit_stage, node_types_from_ray, node_types_from_yaml, stage_bundles)

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 16          # images decoded per split
LABEL_PASS_MAX_BYTES = 1 << 30  # webdataset without counts: a label pass over at most this many bytes


# ---------------------------------------------------------------------------- config

def check_config(cfg: Config, report: CheckReport) -> None:
    """Every active stage's pure ``check`` (registry.check)."""
    from hello_ray import registry

    try:
        registry.check(cfg)
    except ConfigError as e:
        report.add("config", "fail", str(e))
        return
    names = ", ".join(s.STAGE for s in registry.active_stages(cfg))
    report.add("config", "ok", f"every stage's check passed ({names})")


# ---------------------------------------------------------------------------- store

def _local_root(uri: str) -> Path | None:
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return None
    return Path(urlparse(uri).path if scheme == "file" else uri).expanduser()


def check_store(cfg: Config, report: CheckReport) -> Any:
    """Reach the store and write, read back and delete a probe object; returns the store or None."""
    from hello_ray.registry import open_run_store
    from hello_ray.store import StoreError

    local = _local_root(cfg.store)
    report.facts["store_created"] = local is not None and not local.exists()
    try:
        store = open_run_store(cfg)
    except StoreError as e:
        report.add("store", "fail", str(e))
        return None
    key = f"_preflight-probe-{uuid.uuid4().hex[:10]}"
    payload = os.urandom(64)
    try:
        store.put_bytes(key, "probe.bin", payload)
        back = store.get_bytes(key, "probe.bin")
        if back != payload:
            raise StoreError(f"{store.uri_for(key, 'probe.bin')}: read back {len(back)} bytes that differ from "
                             "the 64 written")
    except (StoreError, OSError) as e:
        report.add("store", "fail", f"{cfg.store}: cannot write and read back a probe object: {e}")
        return None
    finally:
        try:
            store.remove_folder(key)
        except (StoreError, OSError) as e:  # the probe is tiny; say where it was left
            log.warning("preflight: could not remove the store probe %s: %s", store.uri_for(key), e)
    endpoint = getattr(store, "endpoint_url", None)
    report.add("store", "ok", f"{store.uri}{f' (endpoint {endpoint})' if endpoint else ''}: probe object "
               "written, read back and deleted")
    return store


def tidy_store(cfg: Config, report: CheckReport) -> None:
    """After a failed preflight: remove a local store folder the probe created (if still empty)."""
    local = _local_root(cfg.store)
    if local is None or not report.facts.get("store_created"):
        return
    for folder in sorted((p for p in local.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    if local.is_dir() and not any(local.iterdir()):
        local.rmdir()


# ---------------------------------------------------------------------------- data

def _webdataset_counts(split: Any, store: Any) -> tuple[int, bool]:
    """(images, exact) of a webdataset split whose counts the listing does not give: a label pass
    over its tars when they are small, else the first shard's count times the shard count."""
    from hello_ray.data.readers import ReadTarShards
    from hello_ray.data.sources import _fs_for, detect_layout

    fs, root = _fs_for(split.source, store)
    shards = detect_layout(fs, root, split.split, "webdataset").files
    sizes = [fs.get_file_info(s).size or 0 for s in shards]
    reader = ReadTarShards(fs, len(split.class_keys), labels_only=True)
    if sum(sizes) <= LABEL_PASS_MAX_BYTES:
        return sum(len(b["label"]) for s in shards for b in reader._read(s)), True
    first = sum(len(b["label"]) for b in reader._read(shards[0]))
    return int(round(first * sum(sizes) / max(sizes[0], 1))), False


def _sample_decode(split: Any, n: int) -> tuple[int, list[tuple[str, str]]]:
    """Decode the first ``n`` images of a split through its Ray Data reader: (decoded, corrupt)."""
    from hello_ray.data.errors import CorruptImageError, data_errors
    from hello_ray.data.images import decode_image

    with data_errors():
        batch = split.ds.take_batch(n, batch_format="numpy")
    corrupt = []
    for data, rid in zip(batch["image"], batch["id"]):
        try:
            decode_image(bytes(data), str(rid))
        except CorruptImageError as e:
            corrupt.append((str(rid), e.reason or str(e)))
    return len(batch["id"]), corrupt


def check_data(cfg: Config, store: Any, report: CheckReport, sample_images: int = SAMPLE_IMAGES) -> None:
    """Layout, classes and sizes of the train and val splits, train/val agreement, a decoded sample."""
    from hello_ray.data.errors import DataError
    from hello_ray.data.sources import load_split
    from hello_ray.store import StoreError

    data = cfg.data
    if not data.source:
        report.add("data", "fail", "config key 'data.source' is empty: set it to the dataset root "
                   "(a local path, file:// or s3:// URI) or 'demo'")
        return
    splits = {}
    for role, name in (("train", data.train_split), ("val", data.val_split)):
        try:
            split = load_split(data, name, store)
        except (DataError, StoreError, OSError) as e:
            report.add(f"data.{role}", "fail", str(e))
            continue
        exact = True
        n = split.num_rows
        if n is None:
            try:
                n, exact = _webdataset_counts(split, store)
            except (DataError, OSError) as e:
                report.add(f"data.{role}", "fail", str(e))
                continue
        try:
            decoded, corrupt = _sample_decode(split, sample_images)
        except (DataError, OSError) as e:
            report.add(f"data.{role}", "fail", f"reading a sample of split {name!r}: {e}")
            continue
        splits[role] = split
        report.facts[f"{role}_images"] = int(n)
        report.facts[f"{role}_images_exact"] = exact
        size = f"{n:,} images{'' if exact else ' (estimated from the first shard)'}"
        if corrupt:
            # Named and refused even with data.on_corrupt=skip: corrupt files in a handful of samples
            # say the data needs a look before a cluster is paid for.
            named = "; ".join(f"{rid} ({why})" for rid, why in corrupt[:5])
            report.add(f"data.{role}", "fail", f"{split.source} split {name!r} ({split.format}): {size}, "
                       f"{len(split.class_keys)} classes; {len(corrupt)} of {decoded} sampled images do not "
                       f"decode: {named}")
        else:
            report.add(f"data.{role}", "ok", f"{split.source} split {name!r} ({split.format}): {size}, "
                       f"{len(split.class_keys)} classes, {decoded} sampled images decode")
    if len(splits) == 2:
        train, val = splits["train"], splits["val"]
        if train.class_keys != val.class_keys:
            only_t = sorted(set(train.class_keys) - set(val.class_keys))
            only_v = sorted(set(val.class_keys) - set(train.class_keys))
            report.add("data.classes", "fail", f"{train.source}: train has {len(train.class_keys)} classes, "
                       f"val {len(val.class_keys)}; only in train: {only_t[:5]}, only in val: {only_v[:5]}"
                       + ("" if only_t or only_v else " (same classes, different order)"))
        else:
            report.facts["classes"] = len(train.class_keys)
            report.facts["class_names"] = list(train.class_names)
            check_class_names(train, report)
    if "train" in splits and "classes" not in report.facts:
        report.facts.setdefault("classes", len(splits["train"].class_keys))


def check_class_names(split: Any, report: CheckReport) -> None:
    """Readable names for the CLIP prompts: ImageNet synsets mapped, the rest said."""
    from hello_ray.data.classnames import is_wnid

    keys, names = split.class_keys, split.class_names
    wnids = sum(is_wnid(k) for k in keys)
    raw = [k for k, n in zip(keys, names) if is_wnid(n)]
    if raw:
        report.add("class_names", "fail", f"{len(raw)} class ids are not ImageNet-1K synsets torchvision names "
                   f"and have no readable name, e.g. {raw[:3]}; give data.class_names as a mapping id -> name")
        return
    pairs = ", ".join(f"{k} -> {n}" for k, n in list(zip(keys, names))[:3])
    report.add("class_names", "ok", f"{len(keys)} classes named ({wnids} ImageNet synsets mapped): {pairs}, ...")


# ---------------------------------------------------------------------------- the stages' own

def check_stages(cfg: Config, store: Any, report: CheckReport, probe_network: bool = True) -> None:
    """Each active stage's own preflight check (``<stage>_plan.check``: the weights it loads, the
    sources it reads), in recipe order."""
    from hello_ray import registry

    for stage in registry.active_stages(cfg):
        check = getattr(registry.plan(stage), "check", None)
        if check is not None:
            check(cfg, store, report, probe_network)


# ---------------------------------------------------------------------------- all

def run_checks(cfg: Config, cluster_yaml: str | None = None, sample_images: int = SAMPLE_IMAGES,
               probe_network: bool = True) -> tuple[CheckReport, Any]:
    """Every check, in order; returns the report and the opened store (None if it failed)."""
    from hello_ray.runtime import ensure_ray

    report = CheckReport()
    check_config(cfg, report)
    if report.failures():
        return report, None
    store = check_store(cfg, report)
    ensure_ray(cfg.compute)  # the data checks read through Ray Data, as the run does
    check_data(cfg, store, report, sample_images)
    check_stages(cfg, store, report, probe_network)
    check_resources(cfg, report, cluster_yaml)
    if not report.ok:
        tidy_store(cfg, report)
    return report, store
