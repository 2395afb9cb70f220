"""Two Ray nodes of one CPU each: a 2-worker run must put one worker on each, and when the
worker node goes away mid-run, go on with the one worker that fits on the head and finish.

`init_ray` keeps whatever Ray this process already joined, so the fixture shuts the session's
local Ray down first (when a test before this one started it), runs on the cluster, and brings
a local Ray back afterwards for the tests that follow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from raysegbg.checkpoint import list_checkpoints
from raysegbg.config import load_config
from raysegbg.ray_train import fit, init_ray
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

RAYLET_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2 checks its workers every 10 s by default (see init_ray): too slow for a tiny run
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # after a node is lost, Train's view of the cluster lags (up to ~20 s) and it first asks
    # for both workers again, waiting this long (default 60 s) before it sizes down
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
}
API_SERVER = "RAY_API_SERVER_ADDRESS"  # see two_nodes


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
    # the State API (here and in Train's placement-group cleaner, whose processes inherit this
    # environment) asks the API server this names before any address it is given: the
    # session's local Ray's, just shut down, unless it is this cluster's
    dashboard = _free_port()
    previous = os.environ.get(API_SERVER)
    os.environ[API_SERVER] = f"http://127.0.0.1:{dashboard}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,  # the State API below needs it
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard,
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
        os.environ.pop(API_SERVER)
        if previous is not None:
            os.environ[API_SERVER] = previous
        if had_local_ray:
            init_ray(None)  # the session's shared local Ray, as the next test expects it


def _train_worker_nodes(address: str, alive: bool = False) -> list[str]:
    """Node id of every Ray Train worker actor the cluster has seen (or of the alive ones)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + [("state", "=", "ALIVE")] * alive
    return [actor.node_id for actor in list_actors(address=address, filters=filters, detail=True)]


def _remove_after_first_checkpoint(cluster, run_dir: Path, seen: dict) -> None:
    """Note where the two workers run; once Train has recorded epoch 1's checkpoint, remove
    the worker node (its raylet and the worker on it end)."""
    deadline = time.monotonic() + 300
    while len(seen.setdefault("before", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(Exception):  # the State API may not answer yet
            seen["before"] = _train_worker_nodes(cluster.address, alive=True)
    while not (run_dir / "checkpoint_manager_snapshot.json").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    cluster.remove_node(next(iter(cluster.worker_nodes)))
    seen["checkpoints"] = sorted(p.name for p in run_dir.glob("epoch_*"))


def test_two_workers_on_two_nodes_then_one_after_losing_a_node(two_nodes, tiny_data, tmp_path):
    import ray

    # 10 steps an epoch: the node goes while epoch 2 trains, not after the run has ended
    overrides = tiny_overrides(
        tiny_data, tmp_path,
        **{"scaling.workers": 2, "scaling.min_workers": 1, "logging.name": "two-nodes",
           "logging.max_failures": 1, "train.steps_per_epoch": 10, "logging.image_every": 100},
    )  # fmt: skip
    seen: dict = {}
    remover = threading.Thread(
        target=_remove_after_first_checkpoint,
        args=(two_nodes, tmp_path / "two-nodes", seen),
        daemon=True,
    )
    remover.start()
    result = fit(load_config(None, overrides), address=two_nodes.address)
    remover.join(timeout=60)
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 20
    assert 0 <= result.metrics["val/miou"] <= 1 and result.best_checkpoint is not None
    assert [m["epoch"] for _, m in list_checkpoints(tmp_path / "two-nodes")] == [1, 2]

    assert seen["checkpoints"] == ["epoch_0001"], seen  # removed while epoch 2 trained
    assert len(set(seen["before"])) == 2, seen  # one worker on each node until then
    head = two_nodes.head_node.node_id
    assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == [head]
    # then Train restarted the run from epoch 1's checkpoint on the one worker left room for
    nodes = _train_worker_nodes(two_nodes.address)
    assert len(nodes) == 3 and nodes.count(head) == 2, (nodes, head)
