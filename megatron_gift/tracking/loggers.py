"""The trackers a training run logs to beside its metrics file: TensorBoard, Weights & Biases
and MLflow. Global rank 0 owns them (:class:`megatron_gift.engine.metrics.MetricsLogger`).

A tracker takes the scalars of an iteration, the resolved config once per start of the run,
and is closed at the end. W&B and MLflow keep the id of their run in
``SAVE/tracking/<tracker>.json``: a resumed run (one that starts past iteration 0) continues
that run; a new run, or a branch (``--load A --save B``, whose ``B`` holds no id yet), starts
its own. Neither tracker is forced online or offline: ``WANDB_MODE`` and the MLflow URI decide.
"""

import abc
import importlib
import json
import logging
import os
import time
from typing import Any, Iterator, Mapping, Optional

from omegaconf import OmegaConf

from megatron_gift.errors import UserError

log = logging.getLogger(__name__)
EXTRA = "pip install -e .[tracking]"


class Tracker(abc.ABC):
    """Where a run's numbers go: scalars at an iteration, the config of each start."""

    name = "tracker"

    @abc.abstractmethod
    def log_scalars(self, scalars: Mapping[str, float], iteration: int) -> None:
        """Record ``scalars`` (name -> value) at training iteration ``iteration``."""

    def log_config(self, config: Mapping[str, Any], iteration: int) -> None:
        """Record the resolved run config (nested dict, section -> key -> value) of the start
        at ``iteration`` (0 for a new run)."""

    def close(self, failed: bool = False) -> None:
        """Flush and end; ``failed``: the run ended with an error."""


class TensorBoardTracker(Tracker):
    """Scalars as TensorBoard events under ``directory``."""

    name = "TensorBoard"

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)

    def log_scalars(self, scalars: Mapping[str, float], iteration: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in ``project``, its local files under ``directory``; ``id_file``
    holds its id, continued when ``resume``. Every chart's x axis is ``iteration``, so a
    resumed run that logs an iteration again keeps both points rather than dropping one."""

    name = "W&B"

    def __init__(self, project: str, directory: str, name: Optional[str] = None,
                 id_file: Optional[str] = None, resume: bool = False):
        import wandb

        run_id = _stored(id_file).get("run_id") if resume else None
        os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(project=project, name=name, dir=directory, id=run_id,
                                  resume="allow" if run_id else None)
        except wandb.errors.Error as error:
            raise UserError(f"--wandb-project {project}: W&B could not start a run "
                            f"({_one_line(error)}): log in with `wandb login`, or set "
                            "WANDB_MODE=offline to keep the run on this machine") from None
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        _store(id_file, {"run_id": self.run.id, "project": project})
        log.info(f"W&B: {'continuing' if run_id else 'started'} run {self.run.id} in project "
                 f"{project} ({self.run.dir})")

    def log_scalars(self, scalars: Mapping[str, float], iteration: int) -> None:
        self.run.log({"iteration": iteration, **scalars})

    def log_config(self, config: Mapping[str, Any], iteration: int) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    """An MLflow run in ``experiment`` at ``tracking_uri`` (None: MLflow's default), through
    the client API (no process-wide active run); ``id_file`` holds its id, continued when
    ``resume``. The config goes in as parameters ``section.key`` (as of the run's first start;
    values cut at MLflow's limit, 6000 characters in MLflow 3) and whole, per start, as the
    artifact ``config/start-<iteration>.json``."""

    name = "MLflow"

    def __init__(self, tracking_uri: Optional[str], experiment: Optional[str],
                 run_name: Optional[str] = None, id_file: Optional[str] = None,
                 resume: bool = False):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.run_id = (self._continued(_stored(id_file).get("run_id")) if resume else None) \
                or self._started(experiment, run_name)
        except MlflowException as error:
            where = f"--mlflow-tracking-uri {tracking_uri}" if tracking_uri else \
                f"--mlflow-experiment {experiment} (at MLflow's default tracking URI)"
            raise UserError(f"{where}: MLflow refused it: {_one_line(error)}") from None
        _store(id_file, {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri})

    def _continued(self, run_id: Optional[str]) -> Optional[str]:
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as error:
            log.warning(f"MLflow: run {run_id} cannot be continued ({_one_line(error)}); "
                        "starting a new one")
            return None
        log.info(f"MLflow: continuing run {run_id} at {self.client.tracking_uri}")
        return run_id

    def _started(self, experiment: Optional[str], run_name: Optional[str]) -> str:
        from mlflow.exceptions import MlflowException

        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # made meanwhile by another run
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = found.experiment_id
        run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        log.info(f"MLflow: started run {run_id} in experiment {name} at "
                 f"{self.client.tracking_uri}")
        return run_id

    def log_scalars(self, scalars: Mapping[str, float], iteration: int) -> None:
        """A request that fails (a server down past the client's retries) is reported, and
        training goes on."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, iteration) for key, value in scalars.items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except MlflowException as error:
            log.warning(f"MLflow: iteration {iteration} not logged ({_one_line(error)})")

    def log_config(self, config: Mapping[str, Any], iteration: int) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params  # MLflow's params are final
        params = [Param(key, value[:MAX_PARAM_VAL_LENGTH])
                  for key, value in flat_params(config) if key not in logged]
        for first in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id,
                                  params=params[first:first + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(self.run_id, dict(config), f"config/start-{iteration:07d}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def flat_params(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(section.key, str(value))`` for every leaf of the nested ``config``."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from flat_params(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


def resolved_config(config: Any) -> dict:
    """The run config (a JobConfig or DictConfig) as a plain nested dict."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def _wanted(logging_config: Any) -> list[tuple[str, str, str]]:
    """``(flag, module, pip package)`` of each of W&B and MLflow the config turns on."""
    wanted = []
    if logging_config.wandb_project:
        wanted.append(("--wandb-project", "wandb", "wandb"))
    if logging_config.mlflow_tracking_uri or logging_config.mlflow_experiment:
        flag = "--mlflow-tracking-uri" if logging_config.mlflow_tracking_uri else \
            "--mlflow-experiment"
        wanted.append((flag, "mlflow", "mlflow-skinny"))
    return wanted


def check_available(logging_config: Any) -> None:
    """Raise a one-line UserError naming the flag and the install command when a tracker the
    ``logging`` section turns on lacks its package. Reads and writes nothing."""
    for flag, module, package in _wanted(logging_config):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{flag} needs the {package} package, which is not installed: "
                            f"pip install {package} (or {EXTRA})") from None


def open_trackers(config: Any, start_iteration: int) -> list[Tracker]:
    """The trackers the run ``config`` (JobConfig) turns on, in the order W&B, MLflow,
    TensorBoard (a refusal comes before TensorBoard writes); ``start_iteration`` > 0 is a
    resumed run. Ids live under ``config.checkpoint.save`` (none without one)."""
    logging_config, save = config.logging, config.checkpoint.save
    check_available(logging_config)
    resume = start_iteration > 0
    default_name = os.path.basename(save.rstrip(os.sep)) if save else None
    makers = []
    if logging_config.wandb_project:
        makers.append(lambda: WandbTracker(
            logging_config.wandb_project, wandb_dir(config),
            logging_config.wandb_exp_name or default_name, _id_file(save, "wandb"), resume))
    if logging_config.mlflow_tracking_uri or logging_config.mlflow_experiment:
        makers.append(lambda: MlflowTracker(
            logging_config.mlflow_tracking_uri, logging_config.mlflow_experiment,
            logging_config.mlflow_run_name or default_name, _id_file(save, "mlflow"), resume))
    if logging_config.tensorboard_dir:
        makers.append(lambda: TensorBoardTracker(logging_config.tensorboard_dir))
    trackers = []
    try:
        for make in makers:
            trackers.append(make())
    except BaseException:
        close_all(trackers, failed=True)
        raise
    return trackers


def close_all(trackers: list[Tracker], failed: bool = False) -> None:
    """Close every tracker, the rest too when one raises (the first error is raised)."""
    error = None
    for tracker in trackers:
        try:
            tracker.close(failed)
        except Exception as raised:  # noqa: BLE001 - re-raised below, after the others close
            error = error or raised
    if error is not None:
        raise error


def wandb_dir(config: Any) -> str:
    """W&B's local directory: ``--wandb-save-dir``, else ``SAVE/wandb``, else ``./wandb``."""
    given = config.logging.wandb_save_dir
    if given:
        return os.path.abspath(os.path.expanduser(given))
    save = config.checkpoint.save
    return os.path.join(save, "wandb") if save else os.path.abspath("wandb")


def _id_file(save: Optional[str], tracker: str) -> Optional[str]:
    return os.path.join(save, "tracking", f"{tracker}.json") if save else None


def _stored(path: Optional[str]) -> dict:
    """The JSON object at ``path``; empty when there is none."""
    if path is None or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _store(path: Optional[str], values: dict) -> None:
    """Write ``values`` as JSON to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(values, f)
    os.replace(tmp, path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
