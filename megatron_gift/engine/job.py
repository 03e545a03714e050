"""Which job a command line names, and its config.

* ``--load DIR`` holding a saved run: that run continues. Its stored config (data, batch,
  sequence length, model, optimizer, ...) is the starting point; a recipe, flags and overrides
  given now apply over it, and the keys that differ from the saved run are reported.
* ``--config`` or ``--train-path``: the job they describe.
* neither: the embedded default job (:mod:`megatron_gift.engine.default_run`).
"""

import logging
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from megatron_gift.config import parse_config
from megatron_gift.core.paths import latest_checkpoint
from megatron_gift.engine import default_run
from megatron_gift.errors import UserError
from megatron_gift.platform.te import refuse_fp8_without_te

log = logging.getLogger(__name__)


def job_config(argv: Sequence[str]) -> DictConfig:
    """The validated config of the job ``argv`` names (see the module docstring); prepares the
    embedded default job's data and base model when that is the job."""
    argv = list(argv)
    load = parse_config(argv).checkpoint.load
    saved = saved_config(load)
    if saved is not None:
        config = parse_config(argv, defaults=saved)
        changed = changed_keys(saved, config)
        log.info(f"continuing the run saved in {load}"
                 + (f"; changed from it: {', '.join(changed)}" if changed else ""))
        return config
    if _names_its_job(argv):
        return parse_config(argv)
    if load:
        from megatron_gift.engine.sources import check_paths

        check_paths(parse_config(argv))  # a --load with nothing to continue: say so
    config = parse_config(argv, defaults=default_run.gift_overrides(default_run.RUN_DIR))
    refuse_fp8_without_te(config)  # before the default job's files are written
    default_run.prepare(default_run.RUN_DIR)
    return config


def saved_config(load: Optional[str]) -> Optional[dict]:
    """The config stored with the newest checkpoint under ``load``, or None when there is none
    yet (a first run with ``--load`` set to its own ``--save``). Raises UserError for a
    weights-only checkpoint, which starts a run but cannot continue one."""
    directory = latest_checkpoint(load)
    if directory is None:
        return None
    from megatron_gift.core.checkpoint import common_state, is_weights_only

    common = common_state(directory)
    if is_weights_only(common):
        source = common.get("run", {}).get("converted_from")
        origin = f" (converted from {source})" if source else ""
        raise UserError(f"--load {load}: {directory} holds weights only{origin}, no training state "
                        f"to resume; pass it as --pretrained-checkpoint {load}")
    return common["run"]["config"]


def changed_keys(saved: dict, config: DictConfig) -> list[str]:
    """``section.key`` of every value ``config`` holds differently from ``saved``."""
    now = OmegaConf.to_container(config)
    changed = []
    for section, values in now.items():
        for key, value in values.items():
            if key in saved.get(section, {}) and saved[section][key] != value:
                changed.append(f"{section}.{key}")
    return [k for k in changed if k != "checkpoint.load"]


def _names_its_job(argv: Sequence[str]) -> bool:
    """True when the command line brings a recipe or its own training data."""
    return any(arg.split("=")[0] in ("--config", "--train-path") or arg.startswith("data.train_path=")
               for arg in argv)
