"""Where a run's work lands on a Ray cluster: the node ids each stage ran on, and the rule that a
local store cannot serve a cluster of several machines.

Recording. ``Run.needs`` calls :func:`begin` with the stage's artifact key before the stage runs;
each stage's Ray Train workers (``launcher.worker_context``), Ray Data actors (their ``__init__``)
and Ray Data tasks (the decode / crop UDFs) call :func:`record` with a role; ``Run.done`` calls
:func:`collect` and writes ``summary["nodes"] = {role: [node ids]}`` into the manifest. A worker
process reports each (key, role) once, to one zero-CPU actor per driver (named, in the job's
namespace), without waiting for an answer: the stage's own work never waits on the bookkeeping.
Ray Data workers learn the key from the Dataset's ``DataContext`` (copied into every task and
actor of its executions), Train workers from the run name (the key, ``launcher.fit``).

The shared-store rule (:func:`check_store_shared`): a local or ``file://`` store on a cluster of
more than one node, or one that an autoscaler may grow, is refused before any stage runs unless
``store_shared=true`` says every node mounts the same file system: otherwise each node's workers
write their part of an artifact to their own disk and the driver finalizes an artifact it cannot
see whole.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable
from urllib.parse import urlparse

from hello_ray.config import ConfigError

log = logging.getLogger("hello_ray.placement")

LOG_ACTOR = "hello_ray_placement"       # one per driver (job); workers find it by name
SCOPE_KEY = "hello_ray.placement_key"   # DataContext config entry: the artifact key being written
TRAIN_WORKERS = "train_workers"
TASKS = "tasks"

_reported: set[tuple[str, str]] = set()   # (key, role) this process has reported
_actor: Any = None                        # this process's handle on the log actor (False: none)
_owned: tuple[tuple[str, str], Any] | None = None  # driver: ((cluster, job id), the handle that created it)
RECORD_TIMEOUT_S = 30.0  # a record's round trip to the log actor; past it, a warning, not a failure


class PlacementLog:
    """The Ray actor holding, per artifact key, the node ids each role reported."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, set[str]]] = {}

    def add(self, key: str, role: str, node: str) -> None:
        self.nodes.setdefault(key, {}).setdefault(role, set()).add(node)

    def take(self, key: str) -> dict[str, list[str]]:
        return {role: sorted(ids) for role, ids in sorted(self.nodes.pop(key, {}).items())}


def node_id() -> str:
    """The Ray node id of this process ('' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def driver_actor_options() -> dict[str, Any]:
    """Ray options for a driver's bookkeeping actor (the placement log, evaluate's row queue):
    zero CPUs, so it fits a head with no room for stage work, and on the driver's own node (the head
    under ``ray job submit``), so a worker node taken back mid-stage cannot take the bookkeeping with
    it. ``soft``: where that node cannot hold it, anywhere rather than nowhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=True)}


def _log_actor(create: bool = False) -> Any:
    """The driver's log actor (created by the driver with ``create``), or None when there is none."""
    global _actor, _owned
    import ray

    if create:
        # Created once per job and its first handle kept: the actor lives as long as its creator's
        # handle does (a second `get_if_exists` handle replacing it lets the actor die).
        # Keyed by the cluster too: job ids restart at 01000000 in every cluster, so a driver that
        # connects to a second cluster (a test process, a notebook) must not reuse the first's handle.
        ctx = ray.get_runtime_context()
        job = (ctx.gcs_address, ctx.get_job_id())
        if _owned is None or _owned[0] != job:
            _owned = (job, ray.remote(PlacementLog).options(name=LOG_ACTOR, get_if_exists=True,
                                                            **driver_actor_options()).remote())
        _actor = _owned[1]
    elif _actor is None:
        try:
            _actor = ray.get_actor(LOG_ACTOR)
        except ValueError:  # a stage run outside Run (a tool, a test): nothing to report to
            _actor = False
    return _actor or None


def begin(key: str) -> None:
    """Driver, before a stage writes ``key``: the log actor exists, and the Ray Data executions
    the stage starts from now on carry ``key`` to their tasks and actors."""
    import ray

    if not ray.is_initialized():  # a stage run without Ray (unit tests of the recipe's bookkeeping)
        return
    import ray.data

    _log_actor(create=True)
    ray.data.DataContext.get_current().set_config(SCOPE_KEY, key)


def record(role: str, key: str | None = None) -> None:
    """In a Ray worker: report this node for ``role`` of the stage writing ``key`` (default: the
    key the running Ray Data execution carries). Once per process, key and role; never raises:
    where the work ran is a record, not a reason to fail the work."""
    global _actor
    try:
        import ray

        if not ray.is_initialized():  # a UDF called directly (unit tests): no Ray, nothing to record
            return
        if key is None:
            import ray.data

            key = ray.data.DataContext.get_current().get_config(SCOPE_KEY, None)
        if not key or (key, role) in _reported:
            return
        actor = _log_actor()
        if actor is not None:
            # Waited for: a call made and not waited for can still be on its way when the task that
            # made it has returned, and the driver's collect right after the stage would miss it.
            ray.get(actor.add.remote(key, role, node_id()), timeout=RECORD_TIMEOUT_S)
        _reported.add((key, role))
    except Exception as e:  # noqa: BLE001 - see the docstring
        _actor = None  # a handle on a log actor gone (another driver's run): looked up again next time
        log.warning("[placement] not recorded for %s/%s: %r", key, role, e)


def collect(key: str) -> dict[str, list[str]]:
    """Driver, after the stage: {role: sorted node ids} reported for ``key`` ({} without a log)."""
    import ray

    if not ray.is_initialized():
        return {}
    actor = _log_actor()
    if actor is None:
        return {}
    try:
        return ray.get(actor.take.remote(key), timeout=30)
    except Exception as e:  # noqa: BLE001 - a lost record must not lose the artifact
        log.warning("[placement] node ids of %s not collected: %s", key, e)
        return {}


# ---------------------------------------------------------------------------- local store on many nodes

def is_local_uri(uri: str) -> bool:
    """A local path or file:// URI (what only one machine's disk holds)."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # len 1: a Windows drive letter


def multinode_reason(nodes: Iterable[dict[str, Any]], autoscaler: bool) -> str:
    """Why this cluster spans (or may span) several machines, '' when it does not.

    ``nodes``: ``ray.nodes()`` entries; ``autoscaler``: an autoscaler with worker node types runs
    (a cluster that starts at one node grows into several)."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"the Ray cluster has {len(alive)} alive nodes"
    if autoscaler:
        return "the Ray cluster runs an autoscaler that adds worker nodes"
    return ""


def check_store_shared(store_uri: str, store_shared: bool, reason: str) -> None:
    """Refuse a local store on a multi-node cluster (``reason`` from :func:`multinode_reason`)
    unless ``store_shared`` declares it one file system mounted on every node."""
    if reason and is_local_uri(store_uri) and not store_shared:
        raise ConfigError(
            f"config key 'store': {store_uri} is a local store, but {reason}: workers on other machines "
            "would write their part of each artifact to their own disk. Use an s3:// store, or set "
            "store_shared=true if this path is one file system mounted on every node (NFS, EFS, Lustre)")


def autoscaler_running() -> bool:
    """Whether the connected cluster has an autoscaler that can add worker nodes (driver side).

    Autoscaler v2 (KubeRay) publishes its node groups in the GCS (a group that may grow counts); v1
    (``ray up``, the fake multi-node provider) writes a status every update whose node types are the
    config's names (``ray.head.default``), where a Ray without an autoscaling config (``ray.init()``,
    a bare ``ray start --head``) reports only its read-only provider's ``node_<id>`` types. Private
    Ray APIs: an unreadable answer counts as no autoscaler (the alive-node count still decides)."""
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        config = state.get_cluster_config()
        # Ray Data's own reading of it (ray/data/_internal/cluster_autoscaler/util.py): a group
        # with resources that may grow (max_count -1 = unlimited, or above its min_count).
        if config is not None and any(g.max_count == -1 or g.max_count > g.min_count
                                      for g in config.node_group_configs if g.resources and g.max_count != 0):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if status:
            return bool(_configured_node_types(json.loads(status).get("autoscaler_report") or {}))
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.debug("autoscaler state not readable: %s", e)
    return False


def _configured_node_types(report: dict[str, Any]) -> set[str]:
    """Node type names in a v1 autoscaler report that come from an autoscaling config (not the
    read-only provider's ``node_<node id>``, ray/autoscaler/_private/util.py format_readonly_node_type)."""
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    types |= set(report.get("pending_launches") or {}) | set((report.get("node_type_mapping") or {}).values())
    return {t for t in types if not t.startswith("node_")}


def check_cluster_store(store_uri: str, store_shared: bool) -> None:
    """:func:`check_store_shared` against the connected Ray cluster (driver, after ``ensure_ray``)."""
    if not is_local_uri(store_uri) or store_shared:
        return
    import ray

    check_store_shared(store_uri, store_shared, multinode_reason(ray.nodes(), autoscaler_running()))
