"""Two Ray nodes of one CPU each: a 2-worker run must put one worker on each and finish.

`init_ray` keeps whatever Ray this process already joined, so the fixture shuts the session's
local Ray down first (when a test before this one started it), runs on the cluster, and brings
a local Ray back afterwards for the tests that follow.
"""

from __future__ import annotations

import socket

import pytest

from raysegbg.checkpoint import list_checkpoints
from raysegbg.config import load_config
from raysegbg.ray_train import fit, init_ray
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

# Train V2 checks its workers every 10 s by default (see init_ray): too slow for a tiny run
RAYLET_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    """A head and one worker node, 1 CPU each, on free ports (another Ray may be running)."""
    import ray
    from ray.cluster_utils import Cluster

    had_local_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,  # the State API below needs it
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
            "env_vars": RAYLET_ENV,
        },
    )
    try:
        cluster.add_node(num_cpus=1, env_vars=RAYLET_ENV)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local_ray:
            init_ray(None)  # the session's shared local Ray, as the next test expects it


def _train_worker_nodes(address: str) -> list[str]:
    """Node id of every Ray Train worker actor the cluster has seen (alive or finished)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    return [actor.node_id for actor in actors]


def test_two_workers_on_two_nodes(two_nodes, tiny_data, tmp_path):
    overrides = tiny_overrides(
        tiny_data, tmp_path, **{"scaling.workers": 2, "logging.name": "two-nodes"}
    )
    result = fit(load_config(None, overrides), address=two_nodes.address)
    assert result.metrics["epoch"] == 2 and 0 <= result.metrics["val/miou"] <= 1
    assert result.best_checkpoint is not None
    assert {m["epoch"] for _, m in list_checkpoints(tmp_path / "two-nodes")} <= {1, 2}

    import ray

    nodes = _train_worker_nodes(two_nodes.address)
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2 and set(nodes) == alive, (nodes, alive)  # one worker on each node
