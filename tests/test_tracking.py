"""Weights & Biases and MLflow beside TensorBoard (``megatron_gift/tracking/loggers.py``): the
values logged are read back from what each wrote (W&B's offline run file, MLflow's file store),
a resumed run continues its W&B and MLflow runs while a new run or a branch gets its own, and a
missing package is one line naming the flag. Nothing here reaches the network: W&B runs
offline and MLflow writes to a file store under the test's directory.

MLflow through its client starts no process (unit tier); ``wandb.init`` starts W&B's service
program ``wandb-core`` (and ``git``), so the W&B tests are ``system``."""

import glob
import json
import math
import os
import re
import struct
import sys
import time

import pytest
from omegaconf import OmegaConf

from megatron_gift.config.schema import JobConfig
from megatron_gift.engine.metrics import MetricsLogger
from megatron_gift.errors import UserError
from megatron_gift.tracking.loggers import (MlflowTracker, check_available, open_trackers,
                                            resolved_config)
from support.parallel_harness import TINY_MODEL, train_here

SCALARS = {1: {"loss": 2.5, "lr": 1e-3}, 2: {"loss": 2.25, "lr": 1e-3},
           3: {"loss": 2.0, "lr": 5e-4}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """W&B offline and quiet, its settings and caches under the test's directory; MLflow's
    file store allowed and its telemetry off."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data",
                       "MLFLOW_ALLOW_FILE_STORE": "true",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


def _config(save, **logging):
    config = OmegaConf.structured(JobConfig)
    config.checkpoint.save = str(save) if save else None
    config.gift.beta = math.inf
    for key, value in logging.items():
        config.logging[key] = value
    return config


def _mlflow(tmp_path, save, **logging):
    return _config(save, mlflow_tracking_uri=f"file://{tmp_path}/mlruns",
                   mlflow_experiment="gift", **logging)


def _start(config, start_iteration, iterations):
    """One start of a run: open the trackers, log the config and ``SCALARS`` at
    ``iterations``, close; returns the trackers."""
    trackers = open_trackers(config, start_iteration)
    for tracker in trackers:
        tracker.log_config(resolved_config(config), start_iteration)
        for iteration in iterations:
            tracker.log_scalars(SCALARS[iteration], iteration)
        tracker.close()
    return trackers


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")


def _history(client, run_id, key="loss"):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# MLflow (unit: its client starts no process)

def test_mlflow_gets_the_scalars_the_params_and_the_config(tmp_path):
    config = _mlflow(tmp_path, tmp_path / "run")
    (tracker,) = _start(config, 0, [1, 2, 3])
    client = _client(tmp_path)
    run = client.get_run(tracker.run_id)
    assert _history(client, tracker.run_id) == [(i, SCALARS[i]["loss"]) for i in (1, 2, 3)]
    assert _history(client, tracker.run_id, "lr") == [(i, SCALARS[i]["lr"]) for i in (1, 2, 3)]
    assert run.data.params["gift.beta"] == "inf"
    assert run.data.params["checkpoint.save"] == str(tmp_path / "run")
    assert run.data.params["logging.mlflow_experiment"] == "gift"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "gift"
    artifact = client.download_artifacts(tracker.run_id, "config/start-0000000.json",
                                         str(tmp_path / "download"))
    with open(artifact) as f:
        assert json.load(f) == json.loads(json.dumps(resolved_config(config)))


def test_mlflow_cuts_a_long_param_and_keeps_it_whole_in_the_artifact(tmp_path):
    config = _mlflow(tmp_path, tmp_path / "run")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # 6000 characters in MLflow 3

    config.data.train_path = "d" * (MAX_PARAM_VAL_LENGTH + 1000)
    (tracker,) = _start(config, 0, [1])
    client = _client(tmp_path)
    params = client.get_run(tracker.run_id).data.params
    assert params["data.train_path"] == "d" * MAX_PARAM_VAL_LENGTH
    artifact = client.download_artifacts(tracker.run_id, "config/start-0000000.json",
                                         str(tmp_path / "download"))
    with open(artifact) as f:
        assert json.load(f)["data"]["train_path"] == "d" * (MAX_PARAM_VAL_LENGTH + 1000)


def test_a_resumed_run_continues_its_mlflow_run_and_a_branch_or_new_run_gets_its_own(tmp_path):
    first = _mlflow(tmp_path, tmp_path / "run")
    (started,) = _start(first, 0, [1, 2])
    resumed_config = _mlflow(tmp_path, tmp_path / "run")
    resumed_config.training.train_iters = 5  # a param that changed: kept as first logged
    (resumed,) = _start(resumed_config, 2, [3])
    client = _client(tmp_path)
    assert resumed.run_id == started.run_id
    assert _history(client, started.run_id) == [(i, SCALARS[i]["loss"]) for i in (1, 2, 3)]
    assert client.get_run(started.run_id).data.params["training.train_iters"] == "100"
    artifacts = {a.path for a in client.list_artifacts(started.run_id, "config")}
    assert artifacts == {"config/start-0000000.json", "config/start-0000002.json"}
    (branch,) = _start(_mlflow(tmp_path, tmp_path / "branch"), 2, [3])
    (anew,) = _start(_mlflow(tmp_path, tmp_path / "run"), 0, [1])
    assert len({started.run_id, branch.run_id, anew.run_id}) == 3
    with open(tmp_path / "run" / "tracking" / "mlflow.json") as f:
        assert json.load(f)["run_id"] == anew.run_id  # the run in SAVE now


def test_a_run_id_that_is_gone_starts_a_new_mlflow_run(tmp_path):
    (started,) = _start(_mlflow(tmp_path, tmp_path / "run"), 0, [1])
    (tmp_path / "run" / "tracking" / "mlflow.json").write_text('{"run_id": "0123456789abcdef"}')
    (resumed,) = _start(_mlflow(tmp_path, tmp_path / "run"), 1, [2])
    assert resumed.run_id not in (started.run_id, "0123456789abcdef")
    assert _history(_client(tmp_path), resumed.run_id) == [(2, SCALARS[2]["loss"])]


def test_an_mlflow_store_it_refuses_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    uri = f"file://{tmp_path}/mlruns"
    with pytest.raises(UserError, match=f"^--mlflow-tracking-uri {uri}: MLflow refused it: "
                                        ".*MLFLOW_ALLOW_FILE_STORE=true") as raised:
        MlflowTracker(uri, "gift")
    assert "\n" not in str(raised.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # --mlflow-experiment alone: MLflow's default
    with pytest.raises(UserError, match="^--mlflow-experiment gift \\(at MLflow's default tracking "
                                        "URI\\): MLflow refused it: "):
        MlflowTracker(None, "gift")


def test_an_mlflow_request_that_fails_mid_run_is_reported_and_training_goes_on(tmp_path,
                                                                              caplog):
    (tracker,) = open_trackers(_mlflow(tmp_path, tmp_path / "run"), 0)
    tracker.run_id = "0123456789abcdef"  # a run the store does not hold
    tracker.log_scalars(SCALARS[1], 1)
    assert "MLflow: iteration 1 not logged (" in caplog.text


def test_metrics_logger_writes_each_record_to_mlflow_and_the_metrics_file(tmp_path):
    config = _mlflow(tmp_path, tmp_path / "run", metrics_file=str(tmp_path / "m.jsonl"),
                     tensorboard_dir=str(tmp_path / "tb"), progress=False)
    logger = MetricsLogger(config, 3, 0, enabled=True)
    for iteration in (1, 2, 3):
        logger.log({"iteration": iteration, **SCALARS[iteration]})
    logger.log({"iteration": 3, "valid_ce": 1.5})
    logger.close()
    run_id = logger.trackers[0].run_id
    client = _client(tmp_path)
    assert _history(client, run_id) == [(i, SCALARS[i]["loss"]) for i in (1, 2, 3)]
    assert _history(client, run_id, "valid_ce") == [(3, 1.5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4


def test_a_run_that_raises_ends_its_mlflow_run_failed(tmp_path):
    logger = MetricsLogger(_mlflow(tmp_path, tmp_path / "run", progress=False), 3, 0, True)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("a step failed")
        finally:
            logger.close()
    assert _client(tmp_path).get_run(logger.trackers[0].run_id).info.status == "FAILED"


# A missing package (unit)

@pytest.mark.parametrize("module,logging,message", [
    ("wandb", {"wandb_project": "gift"},
     "--wandb-project needs the wandb package, which is not installed: pip install wandb "
     "(or pip install -e .[tracking])"),
    ("mlflow", {"mlflow_tracking_uri": "http://localhost:5000"},
     "--mlflow-tracking-uri needs the mlflow-skinny package, which is not installed: "
     "pip install mlflow-skinny (or pip install -e .[tracking])"),
    ("mlflow", {"mlflow_experiment": "gift"},
     "--mlflow-experiment needs the mlflow-skinny package, which is not installed: "
     "pip install mlflow-skinny (or pip install -e .[tracking])"),
])
def test_a_missing_package_is_one_line_naming_the_flag_before_anything_is_written(
        tmp_path, monkeypatch, module, logging, message):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    config = _config(tmp_path / "run", metrics_file=str(tmp_path / "run" / "metrics.jsonl"),
                     tensorboard_dir=str(tmp_path / "run" / "tensorboard"), **logging)
    with pytest.raises(UserError) as raised:
        check_available(config.logging)
    assert str(raised.value) == message
    for enabled in (True, False):  # every rank refuses, not only the one that logs
        with pytest.raises(UserError, match=re.escape(message)):
            MetricsLogger(config, 3, 0, enabled)
    assert not (tmp_path / "run").exists()


def test_trackers_left_unset_need_no_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    check_available(_config(tmp_path).logging)
    assert open_trackers(_config(None), 0) == []


# Weights & Biases (system: wandb.init starts the wandb-core program)

def _wandb_records(save_dir, run_id, timeout=60.0):
    """The records of every offline run file of ``run_id`` under ``save_dir``, as
    ``wandb_internal_pb2.Record`` protobufs, file by file in the order written. ``run.finish()``
    returns before wandb-core has written the whole file: each file is read once it ends with
    its start's ``exit`` record (within ``timeout`` seconds)."""
    files = sorted(glob.glob(os.path.join(save_dir, "wandb", f"offline-run-*-{run_id}*",
                                          f"run-{run_id}.wandb")), key=os.path.getmtime)
    assert files, f"no offline run file of {run_id} under {save_dir}"
    deadline = time.monotonic() + timeout
    records = []
    for path in files:
        while True:
            found = _wandb_file_records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                break
            assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
            time.sleep(0.1)
        records += found
    return records


def _wandb_file_records(path):
    """One offline run file's records (W&B's LevelDB-style log: a 7-byte header, 32 KiB blocks
    of chunks with a 7-byte header each); a record still being written is left out."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, position, chunks = [], 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        if position + 7 + length > len(data):  # a chunk not yet written whole
            break
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _key(item):
    """The name of a W&B history or config item (``key``, or its ``nested_key`` path)."""
    return item.key or "/".join(item.nested_key)


def _wandb_history(save_dir, run_id, key="loss"):
    """``[(iteration, value)]`` of ``key`` in the W&B run ``run_id``."""
    rows = []
    for record in _wandb_records(save_dir, run_id):
        if record.WhichOneof("record_type") == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            if key in row:
                rows.append((row["iteration"], row[key]))
    return rows


def _wandb_config(save_dir, run_id):
    """The config of the run (its last update of each key)."""
    config = {}
    for record in _wandb_records(save_dir, run_id):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else \
            record.config.update if kind == "config" else []
        config.update({_key(item): json.loads(item.value_json) for item in updates})
    return config


@pytest.mark.system
def test_wandb_offline_gets_the_scalars_and_the_config(tmp_path):
    config = _config(tmp_path / "run", wandb_project="gift")
    (tracker,) = _start(config, 0, [1, 2, 3])
    wandb_dir = tmp_path / "run" / "wandb"
    run_id = tracker.run.id
    assert (wandb_dir / "wandb").is_dir()
    assert _wandb_history(wandb_dir, run_id) == [(i, SCALARS[i]["loss"]) for i in (1, 2, 3)]
    assert _wandb_history(wandb_dir, run_id, "lr") == [(i, SCALARS[i]["lr"]) for i in (1, 2, 3)]
    logged = _wandb_config(wandb_dir, run_id)
    assert logged["gift"]["beta"] == math.inf
    assert logged["checkpoint"]["save"] == str(tmp_path / "run")
    run = next(r.run for r in _wandb_records(wandb_dir, run_id)
               if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("gift", "run")


@pytest.mark.system
def test_a_resumed_run_continues_its_wandb_run_and_a_branch_or_new_run_gets_its_own(tmp_path):
    (started,) = _start(_config(tmp_path / "run", wandb_project="gift"), 0, [1, 2])
    (resumed,) = _start(_config(tmp_path / "run", wandb_project="gift"), 2, [3])
    assert resumed.run.id == started.run.id
    assert _wandb_history(tmp_path / "run" / "wandb", started.run.id) == \
        [(i, SCALARS[i]["loss"]) for i in (1, 2, 3)]
    (branch,) = _start(_config(tmp_path / "branch", wandb_project="gift"), 2, [3])
    (anew,) = _start(_config(tmp_path / "run", wandb_project="gift"), 0, [1])
    assert len({started.run.id, branch.run.id, anew.run.id}) == 3
    with open(tmp_path / "run" / "tracking" / "wandb.json") as f:
        assert json.load(f) == {"run_id": anew.run.id, "project": "gift"}


@pytest.mark.system
def test_wandb_save_dir_puts_wandbs_files_there(tmp_path):
    config = _config(tmp_path / "run", wandb_project="gift", wandb_exp_name="named",
                     wandb_save_dir=str(tmp_path / "elsewhere"))
    (opened,) = _start(config, 0, [1])
    assert _wandb_history(tmp_path / "elsewhere", opened.run.id) == [(1, SCALARS[1]["loss"])]
    assert not (tmp_path / "run" / "wandb").exists()
    assert (tmp_path / "run" / "tracking" / "wandb.json").is_file()  # the id stays in SAVE


# Through the trainer: a tiny GIFT run in this process (and its resume)

def _gift_run(world, save, train_iters, wandb=True, **checkpoint):
    trackers = {"mlflow_tracking_uri": f"file://{save.parent}/mlruns", "mlflow_experiment": "gift",
                **({"wandb_project": "gift"} if wandb else {})}
    return {"model": dict(TINY_MODEL),
            "data": {"train_path": world["demos"]},
            "training": {"train_iters": train_iters, "micro_batch_size": 2,
                         "global_batch_size": 4},
            "optimizer": {"lr": 1e-2, "lr_decay_style": "constant"},
            "gift": {"beta": 3.0},
            "checkpoint": {"pretrained_checkpoint": world["base"], "save": str(save),
                           "save_interval": 1, **checkpoint},
            "logging": {"progress": False, **trackers}}


def _logged_losses(save):
    """``[(iteration, loss)]`` of the run's metrics file."""
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _stored_id(save, tracker):
    with open(save / "tracking" / f"{tracker}.json") as f:
        return json.load(f)["run_id"]


def test_the_trainer_logs_every_iteration_and_the_resolved_config_to_mlflow(tiny_world,
                                                                             tmp_path):
    save = tmp_path / "run"
    assert train_here(_gift_run(tiny_world, save, 2, wandb=False)) == 2
    client, run_id = _client(tmp_path), _stored_id(save, "mlflow")
    assert [i for i, _ in _logged_losses(save)] == [1, 2]
    assert _history(client, run_id) == _logged_losses(save)
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [1, 2]
    run = client.get_run(run_id)
    assert run.data.params["gift.beta"] == "3.0" and run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == str(TINY_MODEL["hidden_size"])
    assert run.data.params["model.vocab_size"] not in ("None", "")  # resolved, not as given
    assert not (save / "wandb").exists()


@pytest.mark.system
def test_the_trainer_logs_every_iteration_to_wandb_and_mlflow_and_a_resume_continues(
        tiny_world, tmp_path):
    save = tmp_path / "run"
    assert train_here(_gift_run(tiny_world, save, 2)) == 2
    resumed = _gift_run(tiny_world, save, 3, load=str(save))
    assert train_here(resumed, argv=["--override-opt-param-scheduler"]) == 3
    logged = _logged_losses(save)
    assert [i for i, _ in logged] == [1, 2, 3]
    client, mlflow_run = _client(tmp_path), _stored_id(save, "mlflow")
    assert _history(client, mlflow_run) == logged
    assert client.get_run(mlflow_run).info.status == "FINISHED"
    wandb_run = _stored_id(save, "wandb")
    assert _wandb_history(save / "wandb", wandb_run) == logged
    assert len(glob.glob(str(save / "wandb" / "wandb" / f"offline-run-*-{wandb_run}*"))) == 2
