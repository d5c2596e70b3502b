"""Preflight's resource checks: each active stage's ask (its bundles, from what the stage declares:
``KIND``, ``resources(cfg)``, ``pool(cfg)``, ``pool_reads_data(cfg)``) against the node types of an autoscaler YAML
or the live Ray's nodes, and a local store on a cluster of several machines."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from hello_ray.config import Config, ConfigError
from hello_ray.preflight.check_report import CheckReport


def stage_bundles(stage: Any, cfg: Config) -> list[dict[str, float]]:
    """What ``stage`` asks Ray for, one dict per worker / actor / data task (their sum is the
    stage's ``resources(cfg)``, checked here so the two never drift)."""
    c = cfg.compute
    gpu = 1.0 if c.use_gpu else 0.0
    read = {"CPU": cfg.data.cpus_per_task, "GPU": 0.0}
    name = stage.STAGE
    if stage.KIND == "train":  # a worker's GPU share: evaluate's queue mode may hold a fraction each
        share = float(stage.resources(cfg).get("GPU", 0.0)) / c.num_workers
        out = [{"CPU": c.cpus_per_worker, "GPU": share}] * c.num_workers + [read]
    elif stage.KIND == "driver":  # the driver's own threads (external's reads): one bundle
        out = [{"CPU": 0.0, "GPU": 0.0, **stage.resources(cfg)}]
    else:  # an actor pool, as the stage sizes it
        actors, cpus = stage.pool(cfg)
        out = [{"CPU": cpus, "GPU": gpu}] * actors
        if stage.pool_reads_data(cfg):
            out = out + [read]
    total = stage.resources(cfg)
    for kind in ("CPU", "GPU"):
        if abs(sum(b[kind] for b in out) - float(total.get(kind, 0.0))) > 1e-6:
            raise AssertionError(f"preflight: stage {name} bundles {out} do not add up to its resources {total}")
    return out


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


def node_types_from_yaml(path: str) -> list[NodeType]:
    """The node types of a Ray autoscaler YAML (``available_node_types``; the head counts once)."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    types = doc.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"{path}: no 'available_node_types' (the Ray autoscaler's node types) to check against")
    head, cap = doc.get("head_node_type"), int(doc.get("max_workers", 2 ** 31))
    out = []
    for name, spec in types.items():
        res = {k: float(v) for k, v in ((spec or {}).get("resources") or {}).items()}
        count = 1 if name == head else min(int((spec or {}).get("max_workers", cap)), cap)
        out.append(NodeType(name, res, count))
    return out


def node_types_from_ray() -> list[NodeType]:
    """The live cluster's alive nodes, one 'type' each."""
    import ray

    return [NodeType(n.get("NodeManagerAddress", n["NodeID"][:8]) + f" ({n['NodeID'][:8]})",
                     {k: float(v) for k, v in n["Resources"].items()}, 1)
            for n in ray.nodes() if n.get("Alive")]


def _fmt(res: Mapping[str, float]) -> str:
    shown = ", ".join(f"{k} {v:g}" for k, v in res.items() if k in ("CPU", "GPU") and v)
    # An autoscaler YAML may leave resources out (inferred from the instance type): say so, not "{}".
    return "{" + (shown or "no CPU/GPU declared") + "}"


def fit_stage(name: str, bundles: list[dict[str, float]], nodes: list[NodeType], where: str) -> str:
    """'' when every bundle fits some node type and the total fits the cluster's most; else why not."""
    if not nodes:
        return f"stage '{name}' asks for {len(bundles)} bundles but {where} has no nodes"
    for b in bundles:
        if not any(all(n.resources.get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for n in nodes):
            kinds = " and ".join(k for k, v in b.items() if v)
            return (f"stage '{name}' asks for {_fmt(b)} per worker/actor/task, which no node type of {where} "
                    f"can hold (types: {'; '.join(f'{n.name} {_fmt(n.resources)}' for n in nodes)}); "
                    f"it would wait forever: add a node type with that {kinds}"
                    + (" or set compute.use_gpu=false" if b.get("GPU") else " or lower the stage's CPUs"))
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0.0) for b in bundles)
        most = sum(n.resources.get(kind, 0.0) * n.max_count for n in nodes)
        if need > most + 1e-9:
            return (f"stage '{name}' asks for {need:g} {kind} at once but {where} has at most {most:g}; it would "
                    "wait forever: lower compute.num_workers / the stage's num_actors, or raise max_workers")
    return ""


def check_resources(cfg: Config, report: CheckReport, cluster_yaml: str | None = None) -> None:
    """Each active stage's ask against the node types of ``cluster_yaml`` or the live Ray's nodes."""
    from hello_ray import registry

    try:
        nodes = node_types_from_yaml(cluster_yaml) if cluster_yaml else node_types_from_ray()
    except (ConfigError, OSError) as e:
        report.add("resources", "fail", str(e))
        return
    where = cluster_yaml or "this Ray cluster"
    _check_store_shared(cfg, report, nodes, cluster_yaml)
    problems = [p for p in (fit_stage(s.STAGE, stage_bundles(s, cfg), nodes, where)
                            for s in registry.active_stages(cfg)) if p]
    if problems and not cluster_yaml and (cfg.compute.address or os.environ.get("RAY_ADDRESS")):
        # A running cluster may autoscale into an ask its nodes cannot hold now (launcher.check_resources
        # leaves such clusters alone for that reason): said, not refused.
        report.add("resources", "warn", "; ".join(problems) + " (the nodes up now; an autoscaler may add "
                   "more: pass --cluster <autoscaler yaml> to check its node types)")
        return
    if problems:
        report.add("resources", "fail", "; ".join(problems))
        return
    asks = ", ".join(f"{s.STAGE} {_fmt(s.resources(cfg))}" for s in registry.active_stages(cfg))
    report.add("resources", "ok", f"{where} can hold every stage's ask: {asks}")


def _check_store_shared(cfg: Config, report: CheckReport, nodes: list[NodeType], cluster_yaml: str | None) -> None:
    """The run's rule (``placement.check_store_shared``) on the cluster checked here: a local store
    on a cluster of several machines (alive now, or the YAML's worker types) needs store_shared."""
    from hello_ray import placement

    if cluster_yaml:
        several = len(nodes) > 1 or any(n.max_count > 1 for n in nodes)  # the head type counts once
        reason = f"the autoscaler config {cluster_yaml} has worker node types" if several else ""
    else:
        import ray

        reason = placement.multinode_reason(ray.nodes(), placement.autoscaler_running())
    try:
        placement.check_store_shared(cfg.store, cfg.store_shared, reason)
    except ConfigError as e:
        report.add("store.shared", "fail", str(e))
