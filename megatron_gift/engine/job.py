"""Which job a command line names, and its config.

* ``--load DIR`` holding a saved run: that run continues. Its stored config (data, batch,
  sequence length, model, optimizer, ...) is the starting point; a recipe, flags and overrides
  given now apply over it, and the keys that differ from the saved run are reported. Where it
  writes is not inherited: the run's own directory (or ``--save``, a branch) decides
  (:func:`megatron_gift.engine.run_spec.inherited_config`).
* ``--config`` or ``--train-path``: the job they describe.
* neither: the caller's default job, if it has one (``megatron-gift train`` passes the
  embedded demo's, :mod:`megatron_gift.demo.default_run`); else the job is not named.
"""

import logging
import os
from typing import Optional, Protocol, Sequence

from omegaconf import DictConfig, OmegaConf

from megatron_gift.config import parse_config
from megatron_gift.core.paths import run_root
from megatron_gift.engine.run_spec import (inherited_config, refuse_what_this_machine_cannot_run,
                                           resume_point)
from megatron_gift.engine.run_spec import saved_config as stored_config
from megatron_gift.errors import ConfigError

log = logging.getLogger(__name__)
# A config refused anyway names what this machine cannot run too: one error, every problem.
MACHINE = (refuse_what_this_machine_cannot_run,)


class DefaultJob(Protocol):
    """A job to run when a command line names none: its directory, its config (a nested dict
    of defaults the flags apply over) and what it must write before it starts."""

    RUN_DIR: str

    def gift_overrides(self, run_dir: str) -> dict: ...

    def prepare(self, run_dir: str) -> None: ...


def job_config(argv: Sequence[str], default_job: Optional[DefaultJob] = None) -> DictConfig:
    """The validated config of the job ``argv`` names (see the module docstring); prepares
    ``default_job``'s files when that is the job."""
    argv = list(argv)
    given = parse_config(argv, refusals=MACHINE).checkpoint
    saved = saved_config(given.load, given.save)
    if saved is not None:
        run_dir = os.path.abspath(given.save or run_root(given.load))
        config = parse_config(argv, defaults=inherited_config(saved, run_dir), refusals=MACHINE)
        changed = changed_keys(saved, config)
        log.info(f"continuing the run saved in {given.load}"
                 + (f"; changed from it: {', '.join(changed)}" if changed else ""))
        return config
    if _names_its_job(argv):
        return parse_config(argv)
    if given.load:
        from megatron_gift.engine.sources import check_paths

        check_paths(parse_config(argv))  # a --load with nothing to continue: say so
    if default_job is None:
        raise ConfigError("no job named: give --config RECIPE.yaml, --train-path DATA, or --load "
                          "a saved run")
    config = parse_config(argv, defaults=default_job.gift_overrides(default_job.RUN_DIR),
                          refusals=MACHINE)
    refuse_what_this_machine_cannot_run(config)  # before the default job's files are written
    default_job.prepare(default_job.RUN_DIR)
    return config


def saved_config(load: Optional[str], save: Optional[str] = None) -> Optional[dict]:
    """The config stored with the checkpoint ``--load`` continues (with ``--save``, for a job
    that resumes itself; :func:`~megatron_gift.engine.run_spec.resume_point`), or None when
    there is none yet. Raises UserError for a weights-only checkpoint."""
    directory = resume_point(load, save, announce=False)
    return None if directory is None else stored_config(directory)


def changed_keys(saved: dict, config: DictConfig) -> list[str]:
    """``section.key`` of every value ``config`` holds differently from ``saved`` (where the
    run writes is not a change: it is where the run lies)."""
    now = OmegaConf.to_container(config)
    changed = []
    for section, values in now.items():
        for key, value in values.items():
            if key in saved.get(section, {}) and saved[section][key] != value:
                changed.append(f"{section}.{key}")
    placement = ("checkpoint.load", "checkpoint.save", "logging.metrics_file",
                 "logging.tensorboard_dir", "logging.wandb_save_dir")
    return [k for k in changed if k not in placement]


def _names_its_job(argv: Sequence[str]) -> bool:
    """True when the command line brings a recipe or its own training data."""
    return any(arg.split("=")[0] in ("--config", "--train-path") or arg.startswith("data.train_path=")
               for arg in argv)
