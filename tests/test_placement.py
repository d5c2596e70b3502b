"""Placement: the node ids a stage's workers report reach the driver by artifact key, and a local
store is refused on a cluster of several nodes unless declared shared.

The multi-node runs themselves (a real head and worker nodes, the autoscaler) are opt-in:
tests/test_multinode.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from hello_ray import placement
from hello_ray.config import ConfigError

HEAD = {"NodeID": "h", "Alive": True}
WORKER = {"NodeID": "w", "Alive": True}
GONE = {"NodeID": "x", "Alive": False}


@pytest.mark.parametrize("nodes, autoscaler, multinode", [
    ([HEAD], False, False),
    ([HEAD, GONE], False, False),          # a node that left does not count
    ([HEAD, WORKER], False, True),
    ([HEAD], True, True),                  # starts at one node, may grow
])
def test_multinode_reason(nodes, autoscaler, multinode):
    assert bool(placement.multinode_reason(nodes, autoscaler)) == multinode


@pytest.mark.parametrize("uri, shared, refused", [
    ("/data/run", False, True),
    ("file:///data/run", False, True),
    ("./artifacts", False, True),
    ("/mnt/nfs/run", True, False),
    ("s3://bucket/run", False, False),
])
def test_local_store_on_many_nodes_is_refused_unless_shared(uri, shared, refused):
    reason = placement.multinode_reason([HEAD, WORKER], False)
    if refused:
        with pytest.raises(ConfigError, match=r"config key 'store': .* 2 alive nodes.*store_shared=true"):
            placement.check_store_shared(uri, shared, reason)
    else:
        placement.check_store_shared(uri, shared, reason)
    placement.check_store_shared(uri, shared, placement.multinode_reason([HEAD], False))  # one node: fine


@pytest.mark.parametrize("report, configured", [
    # ray.init() / a bare `ray start --head`: the read-only provider names each node's type node_<id>
    ({"active_nodes": {"node_ba56": 1}, "node_type_mapping": {"ba56": "node_ba56"}, "legacy": True}, set()),
    # an autoscaling config (cluster/fake-multinode.yaml) at zero workers, then launching one
    ({"active_nodes": {"ray.head.default": 1}}, {"ray.head.default"}),
    ({"active_nodes": {"ray.head.default": 1}, "pending_launches": {"ray.worker.cpu": 1}},
     {"ray.head.default", "ray.worker.cpu"}),
    ({}, set()),
])
def test_autoscaler_config_node_types(report, configured):
    assert placement._configured_node_types(report) == configured


def tag_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    placement.record(placement.TASKS)
    return batch


class Probe:
    def __init__(self) -> None:
        placement.record("Probe")  # Ray Data wraps the class: type(self) is its wrapper

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


def test_workers_report_their_node_under_the_stage_key(ray_local, file_store_uri):
    """Ray Data tasks and actors report under the key ``begin`` set, stage after stage (the second
    stage is where a log actor replaced by a second handle had died); nothing is left for a second
    collect; a Train-style explicit key lands under its own key. On one local Ray every id is this
    node's, and a local store passes the shared-store check there."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    for key in ("teachers-placementtest", "select-placementtest"):
        placement.begin(key)
        ds = ray.data.range(8, override_num_blocks=2).map_batches(tag_batch, num_cpus=0.25)
        if key.startswith("select"):
            ds = ds.map_batches(Probe, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
        assert ds.count() == 8
        expected = {"Probe": [here], "tasks": [here]} if key.startswith("select") else {"tasks": [here]}
        assert placement.collect(key) == expected, key
        assert placement.collect(key) == {}

    @ray.remote(num_cpus=0.25)
    def train_worker() -> None:
        placement.record(placement.TRAIN_WORKERS, key="transfer-placementtest")

    ray.get(train_worker.remote())
    assert placement.collect("transfer-placementtest") == {"train_workers": [here]}
    assert placement.multinode_reason(ray.nodes(), placement.autoscaler_running()) == ""
    placement.check_cluster_store(file_store_uri, False)
