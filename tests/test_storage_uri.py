"""Runs in an object store: `raysegbg.storage` against a local S3 server (moto) and a local
folder, and one tiny Ray Train run with `logging.storage_path=s3://...` end to end."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from raysegbg import storage
from raysegbg.storage import Uri

# Before any test starts Ray: its workers inherit these (moto accepts any credentials).
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)

BUCKET = "raysegbg-test"


@pytest.fixture(scope="module")
def s3_options():
    """A moto S3 server on 127.0.0.1 with one bucket; the URI query options that reach it."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{options}&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield options
    server.stop()


@pytest.fixture(params=["s3", "file", "local"])
def root(request, tmp_path) -> storage.Location:
    """A fresh folder: in the moto bucket, a file:// URI, or a local path."""
    if request.param == "local":
        return tmp_path / "root"
    if request.param == "file":
        return storage.location(f"file://{tmp_path}/root")
    options = request.getfixturevalue("s3_options")
    return storage.location(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}?{options}")


def test_uri_joins_keep_query_options_at_the_end():
    uri = storage.location("s3://b/runs?endpoint_override=h:9&scheme=http")
    assert isinstance(uri, Uri)
    assert uri / "run" / "tb" == "s3://b/runs/run/tb?endpoint_override=h:9&scheme=http"
    assert (uri / "run").name == "run" and (uri / "run").parent == uri
    assert storage.join("gs://b/x/", "y", "z") == "gs://b/x/y/z"
    assert storage.location("/tmp/x") == Path("/tmp/x") and not storage.is_uri(Path("/tmp/x"))


def test_write_read_list_and_overwrite(root):
    target = root / "a" / "b.txt"
    assert not storage.exists(target) and storage.listdir(root / "a") == []
    storage.write_text(target, "one")
    storage.write_bytes(target, b"two")  # replaced whole
    assert storage.read_text(target) == "two" and storage.is_file(target)
    assert storage.listdir(root / "a") == ["b.txt"]
    assert storage.exists(root / "a") and not storage.is_file(root / "a")


def test_folders_upload_download_and_mirror(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"x")
    (src / "sub" / "y.bin").write_bytes(b"y")
    storage.upload_dir(src, root / "up")
    back = storage.download_dir(root / "up", tmp_path / "back")
    assert (back / "x.bin").read_bytes() == b"x" and (back / "sub" / "y.bin").read_bytes() == b"y"

    seen: dict[str, tuple[int, int]] = {}
    assert storage.upload_changed(src, root / "mirror", seen) == 2
    assert storage.upload_changed(src, root / "mirror", seen) == 0  # nothing new
    (src / "x.bin").write_bytes(b"x grown")
    assert storage.upload_changed(src, root / "mirror", seen) == 1
    assert storage.read_bytes(root / "mirror" / "x.bin") == b"x grown"


def test_publish_switches_versions_whole(root, tmp_path):
    assert not storage.fetch_published(root / "snap", tmp_path / "none")
    published = []
    for n in (1, 2, 3):
        src = tmp_path / f"v{n}"
        src.mkdir()
        (src / "data.txt").write_text(f"version {n}")
        published.append(storage.location(storage.publish_dir(src, root / "snap")).name)
    # the current version and the one before it (a reader may still be reading it)
    assert sorted(storage.listdir(root / "snap")) == sorted([storage.CURRENT, *published[1:]])
    got = tmp_path / "got"
    assert storage.fetch_published(root / "snap", got)
    assert (got / "data.txt").read_text() == "version 3"


def test_shared_state_snapshot_in_object_store(s3_options):
    from raysegbg.state.actor import SharedState

    state_dir = f"s3://{BUCKET}/state-{uuid.uuid4().hex[:8]}?{s3_options}"
    first = SharedState(state_dir)
    assert not first.restored
    first.put_memory("memory", 7, {"memory": np.arange(6.0).reshape(2, 3)})
    first.put_labels(["a"], [np.ones((4, 4), np.uint8)], step=7)
    first.persist()
    first.persist()  # a second version replaces the first
    again = SharedState(state_dir)  # what Ray's restart of a crashed actor does
    assert again.restored and again.info()["labels"] == 1
    version, arrays = again.get_memory("memory")
    assert version == 7 and np.array_equal(arrays["memory"], np.arange(6.0).reshape(2, 3))


def test_checkpoints_found_and_loaded_from_object_store(s3_options, tmp_path):
    import torch

    from raysegbg.checkpoint import (
        list_checkpoints,
        load_state,
        pick_checkpoint,
        save_checkpoint,
        save_shared,
    )

    buffer = io.BytesIO()
    np.savez(buffer, memory=np.ones(3))  # a whole file: a cut one makes the checkpoint unreadable
    npz = buffer.getvalue()
    local = tmp_path / "run"
    for epoch, miou in ((1, 0.5), (2, 0.4)):
        folder = save_checkpoint(
            local / f"epoch_{epoch:04d}",
            {"method": {"w": torch.full((2,), float(epoch))}},
            {"epoch": epoch, "metrics": {"val/miou": miou}},
        )
        save_shared(folder, {"memory.npz": npz})
    run = storage.location(f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}?{s3_options}")
    storage.upload_dir(local, run)

    assert [m["epoch"] for _, m in list_checkpoints(run)] == [1, 2]
    best, last = pick_checkpoint(run, "best"), pick_checkpoint(run, "last")
    assert best == run / "epoch_0001" and last == run / "epoch_0002"
    state = load_state(best)
    assert torch.equal(state["method"]["w"], torch.ones(2))
    assert state["shared"] == {"memory.npz": npz}


def test_tensorboard_goes_up_at_sync_and_close(s3_options, tmp_path):
    from raysegbg.tb import RunWriter, sync_all
    from tests.tb_read import scalar_steps

    logdir = storage.location(f"s3://{BUCKET}/tb-{uuid.uuid4().hex[:8]}?{s3_options}")
    writer = RunWriter(logdir)
    writer.scalars({"val/miou": 0.5}, 1)
    sync_all()  # what each epoch's report does
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(logdir))
    writer.scalars({"val/miou": 0.6}, 2)
    writer.close()
    assert not Path(writer.writer.log_dir).exists()  # the local staging folder is removed
    back = storage.download_dir(logdir, tmp_path / "tb")
    assert scalar_steps(back, "val/miou") == [1, 2]


@pytest.mark.slow
def test_training_run_in_object_store(ray_local, tiny_data, s3_options, tmp_path):
    """MCIBI, so the shared-state actor persists into the bucket too."""
    from raysegbg.checkpoint import list_checkpoints
    from raysegbg.cli import main
    from raysegbg.config import load_config
    from raysegbg.inference import evaluate_run
    from raysegbg.ray_train import fit
    from tests.conftest import tiny_overrides
    from tests.tb_read import scalar_steps, tags

    storage_path = f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}?{s3_options}"
    overrides = tiny_overrides(
        tiny_data, storage_path,
        **{"logging.name": "s3-run", "method.name": "mcibi", "method.mcibi.dims": 8,
           "method.mcibi.attention_dims": 4, "train.snapshot_every": 2},
    )  # fmt: skip
    result = fit(load_config(None, overrides))
    run = storage.join(storage_path, "s3-run")
    assert result.run_dir == run and result.metrics["epoch"] == 2
    assert result.best_checkpoint in (run / "epoch_0001", run / "epoch_0002")

    assert storage.is_file(run / "config.yaml")
    assert storage.is_file(run / "state" / "memories" / storage.CURRENT)  # the actor's snapshot
    assert {m["epoch"] for _, m in list_checkpoints(run)} <= {1, 2}
    events = [n for n in storage.listdir(run / "tb") if n.startswith("events.out.tfevents")]
    assert events, storage.listdir(run)
    tb = storage.download_dir(run / "tb", tmp_path / "tb")
    assert scalar_steps(tb, "val/miou") == [1, 2]
    assert "val/images" in tags(tb)["images"]

    assert 0 <= evaluate_run(run, "test")["miou"] <= 1
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--checkpoint", "last", "--json", str(out)]) == 0
    assert out.is_file()


def test_a_dataset_in_object_store_trains_and_evaluates(ray_local, tiny_data, s3_options, tmp_path):
    """`data.path=s3://...`: two workers stream the shards from the bucket (row groups read on
    demand, one background process each) and the run's `eval` reads the test split there."""
    from raysegbg.config import load_config
    from raysegbg.data.loader import SegDataset
    from raysegbg.inference import evaluate_run
    from raysegbg.ray_train import fit
    from tests.conftest import tiny_overrides

    bucket = storage.location(f"s3://{BUCKET}/data-{uuid.uuid4().hex[:8]}?{s3_options}")
    storage.upload_dir(tiny_data, bucket)
    from raysegbg.cli import main

    assert main(["data", "info", str(bucket)]) == 0  # the report reads the bucket's shards
    remote = SegDataset(str(bucket), "train", reader="stream")
    local = SegDataset(tiny_data, "train")
    assert remote.ids == local.ids and np.array_equal(remote[5][0], local[5][0])

    overrides = tiny_overrides(str(bucket), tmp_path, **{"logging.name": "from-s3",
        "scaling.workers": 2, "data.reader": "stream", "data.workers": 1})  # fmt: skip
    result = fit(load_config(None, overrides))
    assert result.metrics["epoch"] == 2
    scores = evaluate_run(tmp_path / "from-s3", "test")
    assert 0 <= scores["miou"] <= 1
    # a missing bucket is one line before Ray starts
    from raysegbg.errors import RaysegbgError
    from raysegbg.ray_train import preflight

    gone = overrides + [f"data.path=s3://no-such-bucket/x?{s3_options}"]
    with pytest.raises(RaysegbgError, match="bucket no-such-bucket .* does not exist"):
        preflight(load_config(None, gone), None)


@pytest.mark.slow
def test_search_in_object_store(ray_local, tiny_data, s3_options, capsys, tmp_path):
    """`raysegbg tune` with an s3:// storage path: trials, ASHA rungs and reports land there.
    The search is over the plug-in method of tests/toy_method.py, which each trial's Ray
    worker imports by the path the config carries (its settings: tests/test_plugin.py)."""
    from raysegbg.cli import main
    from raysegbg.config import load_config
    from tests.conftest import tiny_overrides
    from tests.tb_read import scalar_steps

    storage_path = f"s3://{BUCKET}/tune-{uuid.uuid4().hex[:8]}?{s3_options}"
    overrides = tiny_overrides(tiny_data, storage_path, **{"scaling.workers": 1})
    space = Path(__file__).with_name("toy_space.yaml")
    args = ["tune", "--space", str(space), "--samples", "1", "--max-concurrent", "1"]
    assert main([*args, "--name", "s3-search", *[f"--set={o}" for o in overrides]]) == 0
    search = storage.join(storage_path, "s3-search")
    assert str(search / "best_config.yaml") in capsys.readouterr().out
    for name in ("search.yaml", "asha_rungs.state", "summary.csv", "best_config.yaml"):
        assert storage.is_file(search / name), name
    (trial,) = [n for n in storage.listdir(search) if storage.is_file(search / n / "config.yaml")]
    assert trial.startswith("s3-search_001_")
    # the trial's one HParams session next to its curves; the table's columns in hparams/
    logged = storage.listdir(search / trial / "tb")
    assert sum(name.endswith(".hparams") for name in logged) == 1 and len(logged) > 1
    assert storage.listdir(search / "hparams")
    best = storage.download_dir(search, tmp_path / "search") / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.method.name == "tests.toy_method:Toy" and cfg.method.params.ema in (0.5, 0.8)
    # the plug-in's after_step scalars reached the trial's TensorBoard
    assert 1 in scalar_steps(tmp_path / "search" / trial / "tb", "train/teacher_gap")


def test_unreachable_storage_fails_in_one_line(s3_options):
    from raysegbg.errors import RaysegbgError

    with pytest.raises(RaysegbgError, match="cannot use storage nosuch://"):
        storage.check("nosuch://bucket/runs")
    with pytest.raises(RaysegbgError, match="bucket missing-bucket .* does not exist"):
        storage.check(f"s3://missing-bucket/runs?{s3_options}")
    storage.check(f"s3://{BUCKET}/runs?{s3_options}")  # a new prefix in an existing bucket
