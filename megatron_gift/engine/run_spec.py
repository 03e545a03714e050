"""The run settled once: :func:`resolve` turns a validated config into a frozen
:class:`RunSpec`, before the run lock is taken and before any process group or model exists.
Every rank makes the same file reads and gets the same answer; the trainer's stages only build
from the result.

What it settles, and the rules (docs/training/resume-and-stop.md):

* **Where the run writes.** ``--save``, else the ``--load`` directory (a resumed run writes
  where it was saved; ``--load A --save B`` branches into B and never writes into A). The
  metrics file and TensorBoard default to ``SAVE/metrics.jsonl`` and ``SAVE/tensorboard``.
  Every path is made absolute here, so a later working directory changes nothing.
* **Where it resumes from.** The tracker's iteration under ``--load``. ``iter_*`` directories
  without a tracker: ``--save X --load X`` (the requeue idiom) resumes from the newest complete
  one and says so; ``--load X`` alone names it and how to resume. A damaged checkpoint is
  refused, naming the newest intact one.
* **No overwrite.** A ``--save`` that holds checkpoints of a run this one does not continue is
  refused, naming the two ways forward.
* **What it reads.** The student's initial weights, the reference and the tokenizer, each with a
  fingerprint (:mod:`megatron_gift.core.fingerprints`) recorded in every checkpoint; a resume
  whose sources changed since is refused, naming what changed. A reference whose tokenizer
  differs from the student's is refused.
* **The model.** The ``model`` section completed from a Hugging Face base; a value the user
  set that contradicts the base, or a ``--seq-length`` beyond its ``max_position_embeddings``,
  is refused.
* **Whether there is anything to do.** A resumed run that already reached ``train_iters`` is
  ``finished``: the trainer says so and writes nothing.
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megatron_gift.config import from_container, is_sft
from megatron_gift.config.checks import raise_problems, refused
from megatron_gift.config.schema import JobConfig, Model, flag_name
from megatron_gift.core import checkpoint, paths
from megatron_gift.core.fingerprints import source_fingerprint, tokenizer_fingerprint
from megatron_gift.engine import sources
from megatron_gift.errors import ConfigError, UserError
from megatron_gift.hf.architecture import hf_assets, model_section_from_hf
from megatron_gift.loss.passes import triton_can_run
from megatron_gift.platform import te
from megatron_gift.platform.distributed import world_size_from_env
from megatron_gift.platform.once import cache_root
from megatron_gift.tracking.loggers import check_available

log = logging.getLogger(__name__)
# What a resumed run may change only with --override-opt-param-scheduler.
SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.lr_warmup_iters",
                 "optimizer.lr_decay_style", "training.train_iters")
# Path-valued settings, made absolute when the run is resolved.
PATH_KEYS = ("data.train_path", "data.valid_path", "data.cache_dir", "model.tokenizer",
             "gift.reference_load", "checkpoint.save", "checkpoint.load",
             "checkpoint.pretrained_checkpoint", "logging.metrics_file", "logging.tensorboard_dir",
             "logging.wandb_save_dir")
# Where a run writes beside its checkpoints: relative to the save directory in a checkpoint, so
# that a resumed, copied or branched run writes into its own.
RUN_OUTPUTS = ("metrics_file", "tensorboard_dir", "wandb_save_dir")


@dataclass(frozen=True)
class RunSpec:
    """Everything about a run that is settled before anything is built.

    ``config``: the complete run config (absolute paths, model section filled in);
    ``resume_from``: the iteration directory to continue, or None; ``start_iteration``: its
    iteration (0 for a new run); ``student_source``: the initial weights of a new run (HF
    directory or Megatron checkpoint), or None; ``reference_source``: the frozen reference, None
    for SFT; ``tokenizer``: the loaded ``transformers`` tokenizer; ``conversion``: the HF
    sources converted and the converter (:func:`sources.conversion`); ``fingerprints``: the
    sources' fingerprints, as checkpoints record them.
    """

    config: JobConfig
    resume_from: Optional[str]
    start_iteration: int
    student_source: Optional[str]
    reference_source: Optional[str]
    tokenizer: Any = field(repr=False, compare=False)
    conversion: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)

    @property
    def save(self) -> Optional[str]:
        """The absolute save directory, or None (nothing is saved)."""
        return self.config.checkpoint.save

    @property
    def finished(self) -> bool:
        """A resumed run that already trained ``train_iters`` iterations."""
        return self.resume_from is not None and \
            self.start_iteration >= self.config.training.train_iters

    def describe_places(self) -> str:
        """One line: where the run reads from and writes to."""
        c = self.config
        start = (f"resuming {self.resume_from}" if self.resume_from else
                 f"weights from {self.student_source}" if self.student_source else
                 "random initial weights")
        reference = f"; reference {self.reference_source}" if self.reference_source else ""
        writes = (f"checkpoints {c.checkpoint.save}" if c.checkpoint.save else
                  "no checkpoints (no --save)")
        return (f"run: {start}{reference}; writes {writes}, metrics "
                f"{c.logging.metrics_file or '(none)'}, TensorBoard "
                f"{c.logging.tensorboard_dir or '(none)'}")


def resolve(config: DictConfig) -> RunSpec:
    """Settle the run described by the validated ``config`` (module docstring); raises a
    UserError naming the flag, file or value at fault before anything is written."""
    config = _absolute_paths(config)
    _check_device_and_layout(config)
    sources.check_paths(config)
    resume_from = resume_point(config.checkpoint.load, config.checkpoint.save)
    config = _with_run_paths(config)
    _refuse_overwrite(config, resume_from)
    _check_writable(config)
    check_available(config.logging)  # a tracker's missing package, before any work
    common = checkpoint.common_state(resume_from) if resume_from else {}
    recorded = common.get("run", {})
    if resume_from:
        _check_schedule(config, saved_config(resume_from, common))
    student_source = None if resume_from else config.checkpoint.pretrained_checkpoint
    _refuse_fp8_weights_loaded_under_delayed_scaling(config, student_source)
    reference_source = None if is_sft(config) else _reference_source(config, recorded)
    assets = _model_assets(config, resume_from)
    tokenizer = load_tokenizer(config.model.tokenizer or assets)
    fingerprints = _fingerprints(config, reference_source, tokenizer)
    if resume_from:
        _check_unchanged(resume_from, recorded.get("fingerprints"), fingerprints, {
            "base": config.checkpoint.pretrained_checkpoint, "reference": reference_source,
            "tokenizer": config.model.tokenizer or assets or "the bundled tokenizer"})
    config = _complete_model(config, len(tokenizer), assets)
    _check_reference_tokenizer(reference_source, tokenizer, config)
    return RunSpec(config=OmegaConf.to_object(config), resume_from=resume_from,
                   start_iteration=common.get("iteration", 0), student_source=student_source,
                   reference_source=reference_source, tokenizer=tokenizer,
                   conversion=sources.conversion(config, reference_source, recorded),
                   fingerprints=fingerprints)


def complete_model_section(config: DictConfig) -> DictConfig:
    """``config`` with its model section completed from the HF config of its base (or of the
    run ``--load`` continues), as :func:`resolve` completes it, reading no weights and no data:
    for the memory planner. Without HF assets the model section is returned as given."""
    config = _absolute_paths(config)
    resume_from = resume_point(config.checkpoint.load, config.checkpoint.save, announce=False)
    assets = _model_assets(config, resume_from)
    if assets is None:
        return config
    tokenizer = load_tokenizer(config.model.tokenizer or assets)
    return _complete_model(config, len(tokenizer), assets)


def resume_point(load: Optional[str], save: Optional[str], announce: bool = True) -> Optional[str]:
    """The intact iteration directory that ``--load`` continues, or None for a new run.

    Without a tracker, the newest complete ``iter_*`` directory is taken where ``save`` is
    ``load`` (a job that resumes itself) and named otherwise; a damaged checkpoint is refused
    (:func:`checkpoint.refuse_damaged`). ``announce``: log the untracked resume point."""
    if load is None:
        return None
    directory = paths.latest_checkpoint(load)
    if directory is None:
        directory = _untracked_resume_point(load, save, announce)
    if directory is not None:
        checkpoint.refuse_damaged(directory)
    return directory


def _untracked_resume_point(load: str, save: Optional[str], announce: bool) -> Optional[str]:
    if not paths.iterations(load):
        return None
    newest = checkpoint.newest_intact(load)
    if newest is None:
        raise UserError(f"--load {load}: no {paths.TRACKER} and no intact iter_* directory "
                        "(every save there is incomplete or damaged); start a new run with "
                        "another --save")
    if save is not None and os.path.realpath(save) == os.path.realpath(load):
        if announce:
            log.info(f"{load} has no {paths.TRACKER}: resuming from its newest complete "
                     f"checkpoint {newest}")
        return newest
    raise UserError(f"--load {load}: no {paths.TRACKER} there, but {newest} is its newest "
                    f"complete checkpoint: resume from it with --load {newest} (or --save {load} "
                    f"--load {load})")


def saved_config(directory: str, common: Optional[dict] = None) -> dict:
    """The config the training checkpoint ``directory`` recorded (``common``: its common state,
    when read already), for a resumed run to start from. Raises UserError for a weights-only
    checkpoint, which starts a run but cannot continue one."""
    common = common or checkpoint.common_state(directory)
    if checkpoint.is_weights_only(common):
        source = common.get("run", {}).get("converted_from")
        origin = f" (converted from {source})" if source else ""
        raise UserError(f"--load {paths.run_root(directory)}: {directory} holds weights only"
                        f"{origin}, no training state to resume; pass it as "
                        f"--pretrained-checkpoint {paths.run_root(directory)}")
    return common["run"]["config"]


def portable_config(config: JobConfig) -> dict:
    """The config a checkpoint records: no save or load directory (a run is where it lies),
    and the metrics and TensorBoard paths relative to the save directory when inside it (None
    when outside: a resumed or branched run writes its own)."""
    values = OmegaConf.to_container(OmegaConf.structured(config))
    save = config.checkpoint.save
    values["checkpoint"].update(save=None, load=None)
    if config.model.tokenizer in (hf_assets(sources.model_source(config)), hf_assets(save)):
        values["model"]["tokenizer"] = None  # the base's: taken from the run's hf/ on resume
    for key in RUN_OUTPUTS:
        path = values["logging"][key]
        inside = save is not None and path is not None and _is_inside(path, save)
        values["logging"][key] = os.path.relpath(path, save) if inside else None
    return values


def inherited_config(saved: dict, run_dir: str) -> dict:
    """The ``saved`` config (:func:`portable_config`) as the defaults of a run that writes to
    ``run_dir``: metrics and TensorBoard paths re-rooted there; absolute ones (from checkpoints
    of older versions) dropped, so that no resumed or branched run writes into another's."""
    values = json.loads(json.dumps(saved))
    values.setdefault("checkpoint", {}).update(save=None, load=None)
    for key in RUN_OUTPUTS:
        path = values.get("logging", {}).get(key)
        keep = path is not None and not os.path.isabs(path) and not path.startswith("..")
        values.setdefault("logging", {})[key] = os.path.join(run_dir, path) if keep else None
    return values


def _absolute_paths(config: DictConfig) -> DictConfig:
    config = config.copy()
    for key in PATH_KEYS:
        value = OmegaConf.select(config, key)
        if value is not None:
            OmegaConf.update(config, key, os.path.abspath(os.path.expanduser(value)))
    return config


def _with_run_paths(config: DictConfig) -> DictConfig:
    """``checkpoint.save`` defaults to the run root of ``--load``; metrics and TensorBoard to
    ``SAVE/metrics.jsonl`` and ``SAVE/tensorboard``."""
    saved, logging_config = config.checkpoint, config.logging
    if saved.save is None and saved.load is not None:
        saved.save = paths.run_root(saved.load)
    if saved.save is not None:
        if logging_config.metrics_file is None:
            logging_config.metrics_file = os.path.join(saved.save, "metrics.jsonl")
        if logging_config.tensorboard_dir is None:
            logging_config.tensorboard_dir = os.path.join(saved.save, "tensorboard")
    return config


def _refuse_fp8_weights_loaded_under_delayed_scaling(config: DictConfig,
                                                    student_source: Optional[str]) -> None:
    """FP8 parameters (``--fp8-param-gather``) under delayed scaling quantize weights loaded
    into them with the scale they start with, 1, before any amax is seen: E4M3's smallest step
    there is 2^-9, so weights under ~1e-3 (most of a pretrained model's) load as 0 and the
    student starts far from its base. Current scaling computes each scale from the tensor."""
    precision = config.precision
    if student_source and precision.fp8_param_gather and precision.fp8_recipe == "delayed":
        raise UserError(
            f"precision.fp8_param_gather with precision.fp8_recipe=delayed would load the "
            f"weights of {student_source} into FP8 at scale 1 (weights under ~1e-3 become 0): "
            "use --fp8-recipe tensorwise, or drop --fp8-param-gather")


def _refuse_overwrite(config: DictConfig, resume_from: Optional[str]) -> None:
    """A ``--save`` holding another run's checkpoints is never written into."""
    save = config.checkpoint.save
    if save is None or not paths.holds_checkpoints(save):
        return
    if resume_from is not None and os.path.realpath(paths.run_root(resume_from)) == \
            os.path.realpath(save):
        return
    continued = f" (this run continues {paths.run_root(resume_from)})" if resume_from else ""
    raise UserError(f"--save {save} holds the checkpoints of another run{continued}: pass "
                    f"--load {save} to continue that run, or give this one another --save")


def _check_writable(config: DictConfig) -> None:
    """The save directory and the data cache can be written: a file where a directory should
    be, or a read-only place, is named before any work."""
    cache = config.data.cache_dir or os.path.join(cache_root(), "data")
    for flag, path, fix in (("--save", config.checkpoint.save, "give another --save"),
                            ("the data cache", cache, "set --cache-dir or MEGATRON_GIFT_CACHE")):
        if path is None:
            continue
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file, not a directory: {fix}")
        why = _cannot_write(path)
        if why:
            raise UserError(f"{flag} {path} cannot be written ({why}): {fix}")


def _cannot_write(directory: str) -> Optional[str]:
    """Why nothing can be created in ``directory`` (or its nearest existing parent), or None.
    Tries a file, since permissions do not tell (root, read-only mounts)."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file"
    try:
        fd, probe = tempfile.mkstemp(prefix=".megatron_gift-probe-", dir=existing)
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(fd)
    os.remove(probe)
    return None


def _check_schedule(config: DictConfig, saved: dict) -> None:
    """A changed learning-rate schedule is refused unless the run says to take it
    (Megatron-Core would keep the checkpoint's schedule, and not find its param groups under a
    new lr)."""
    if config.optimizer.override_opt_param_scheduler:
        return
    saved = from_container(saved)
    changed = [f"{key} {OmegaConf.select(saved, key)} -> {OmegaConf.select(config, key)}"
               for key in SCHEDULE_KEYS
               if OmegaConf.select(saved, key) != OmegaConf.select(config, key)]
    if changed:
        raise UserError(f"resuming {config.checkpoint.load} with a changed schedule "
                        f"({'; '.join(changed)}): pass --override-opt-param-scheduler to take "
                        "the new values, or drop the changes to continue the saved schedule")


def _reference_source(config: DictConfig, recorded: dict) -> str:
    """``--reference-load``, else the resumed run's, else the pretrained checkpoint (never the
    run's own checkpoint: the reference is the base model); checked against the student's
    source in dtype, vocab and architecture before any conversion."""
    pretrained = config.checkpoint.pretrained_checkpoint
    source = config.gift.reference_load or recorded.get("reference_source") or pretrained
    if source is None:
        raise UserError("GIFT with finite beta needs a reference: set --reference-load or "
                        "--pretrained-checkpoint (or --gift-beta inf for plain SFT)")
    sources.check_reference_matches(pretrained, source)
    return source


def load_tokenizer(path: Optional[str]) -> Any:
    """The ``transformers`` tokenizer in ``path``, else the bundled one."""
    from transformers import AutoTokenizer

    from megatron_gift.assets import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(path or TOKENIZER_DIR)


def _model_assets(config: DictConfig, resume_from: Optional[str]) -> Optional[str]:
    """The HF config and tokenizer the run is built with: a resumed run's own copy (its
    ``hf/``, so that a copied or moved run stands alone), else its base's."""
    own = hf_assets(paths.run_root(resume_from)) if resume_from else None
    return own or hf_assets(sources.model_source(config))


def _complete_model(config: DictConfig, tokenizer_size: int, assets: Optional[str]) -> DictConfig:
    """The model section from the HF ``assets``, refusing what contradicts them."""
    if assets is not None:
        _refuse_conflicts(config.model, model_section_from_hf(assets), assets)
        _check_context_length(config.model.seq_length, assets)
    return sources.resolve_model(config, tokenizer_size, assets)


def _refuse_conflicts(model: DictConfig, from_hf: dict, assets: str) -> None:
    """A model value set away from its default that the base model contradicts is refused
    (the base's value would silently win). A value set to its default cannot be told from an
    unset one: it is taken from the base."""
    defaults = Model()
    for key, value in from_hf.items():
        mine = model[key]
        if mine != getattr(defaults, key) and mine != value:
            raise ConfigError(f"model.{key}={mine} ({flag_name('model', key)}) contradicts the "
                              f"base model's {value} ({assets}/config.json): drop the setting, "
                              "the architecture comes from the base")


def _check_context_length(seq_length: int, assets: str) -> None:
    with open(os.path.join(assets, "config.json")) as f:
        limit = json.load(f).get("max_position_embeddings")
    if limit is not None and seq_length > limit:
        raise ConfigError(f"model.seq_length={seq_length} (--seq-length) exceeds the base model's "
                          f"max_position_embeddings={limit} ({assets}/config.json), beyond which "
                          "its RoPE positions were never trained: lower --seq-length")


def _fingerprints(config: DictConfig, reference_source: Optional[str], tokenizer) -> dict:
    """What the run reads, as checkpoints record it: the base and reference weights, the
    tokenizer and its size."""
    base = config.checkpoint.pretrained_checkpoint
    return {"base": source_fingerprint(base) if base else None,
            "reference": source_fingerprint(reference_source) if reference_source else None,
            "tokenizer": tokenizer_fingerprint(tokenizer), "vocab": len(tokenizer)}


def _check_unchanged(resume_from: str, recorded: Optional[dict], now: dict,
                     places: dict) -> None:
    """A resumed run reads the sources it started with (checkpoints of older versions recorded
    none: nothing to compare). ``places``: where each source is read from, for the message."""
    if not recorded:
        return
    changed = [f"{what} {places.get(what) or ''} (fingerprint {recorded[what]} -> {now[what]})"
               .replace("  ", " ") for what in now
               if None not in (recorded.get(what), now[what]) and recorded[what] != now[what]]
    if changed:
        raise UserError(f"resuming {resume_from}: what the run started from has changed since: "
                        f"{', '.join(changed)}. Restore the original (--pretrained-checkpoint, "
                        "--reference-load, --tokenizer), or start a new run with another --save")


def _check_reference_tokenizer(reference_source: Optional[str], tokenizer,
                               config: DictConfig) -> None:
    """A reference whose own tokenizer gives other token ids is refused, whatever its size:
    its probabilities would be of other tokens."""
    assets = hf_assets(reference_source)
    student_assets = hf_assets(sources.model_source(config))
    if assets is None or (student_assets is not None and
                          os.path.realpath(assets) == os.path.realpath(student_assets)):
        return
    if tokenizer_fingerprint(load_tokenizer(assets)) != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the reference {reference_source} has another tokenizer than the "
                        f"student's ({config.model.tokenizer}): its vocab or special tokens "
                        "differ, so its probabilities are of other tokens; use a reference with "
                        "the student's tokenizer")


def _is_inside(path: str, directory: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(directory)]) == \
        os.path.abspath(directory)


def _check_device_and_layout(config: DictConfig) -> None:
    """Facts that need no process group: the device can run the layout, and it fits the
    world."""
    refuse_what_this_machine_cannot_run(config)


def refuse_what_this_machine_cannot_run(config: DictConfig) -> None:
    """Raise one UserError naming everything in ``config`` this machine cannot run (a config
    refusal, :func:`megatron_gift.config.parse_config`'s ``refusals``, names them too)."""
    raise_problems(refused(config, [te.refuse_fp8_without_te]) + _device_problems(config),
                   UserError)


def _device_problems(config: DictConfig) -> list[str]:
    parallel, cuda = config.parallel, torch.cuda.is_available()
    problems = []
    if parallel.use_distributed_optimizer and not cuda:
        problems.append("parallel.use_distributed_optimizer needs CUDA: Megatron-Core's "
                        "DistributedOptimizer accepts only CUDA parameters "
                        "(drop --use-distributed-optimizer)")
    if parallel.context_parallel_size > 1 and not (cuda and te.available()):
        problems.append(f"parallel.context_parallel_size={parallel.context_parallel_size} needs "
                        "Transformer Engine's attention on CUDA, which this machine lacks "
                        "(--context-parallel-size 1)")
    if config.gift.loss_implementation == "triton":
        device = torch.accelerator.current_accelerator() if cuda else torch.device("cpu")
        why_not = triton_can_run(device)
        if why_not:
            problems.append(f"gift.loss_implementation=triton cannot run here: {why_not} "
                            "(--gift-loss-implementation auto)")
    world = world_size_from_env()
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if world % (tp * pp * cp):
        problems.append(f"world size {world} is not divisible by tensor x pipeline x context "
                        f"parallel size = {tp} x {pp} x {cp} (--tensor-model-parallel-size, "
                        "--pipeline-model-parallel-size, --context-parallel-size, "
                        "torchrun --nproc-per-node)")
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    if ep > 1 and world % (etp * ep * pp):
        problems.append(f"world size {world} is not divisible by expert tensor x expert x "
                        f"pipeline parallel size = {etp} x {ep} x {pp} (Megatron-Core lays the "
                        "experts out inside data parallelism; --expert-model-parallel-size, "
                        "--expert-tensor-parallel-size)")
    return problems
