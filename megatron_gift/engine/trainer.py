"""The GIFT training loop on Megatron-Core: set-up in named stages, steps, evaluation,
checkpoints, signals.

``train(config)`` runs one job under ``torchrun`` (or as a single process): tensor/pipeline/
data parallel as configured, Megatron's DDP, optimizer and LR schedule, the co-located frozen
reference (none when ``beta = inf``), checkpoints that resume exactly and reshard, and a clean
save-and-exit on SIGTERM or Ctrl-C (:mod:`.signals`). ``train`` is the process's main (it owns
the lock, the signal handlers and a process group it had to make); :class:`Trainer` is the run
itself, inside whatever world exists, so one world can train several runs in turn. The run is
first settled into a
:class:`~megatron_gift.engine.run_spec.RunSpec` (resume point, save directory, sources and
their fingerprints, the complete model section), before the lock is taken or anything is
built; :func:`setup` then builds a :class:`Job` from it, stage by stage:

1. ``_init_parallel_state``   Megatron's TP/PP/DP groups, seeds
2. (conversion)               HF sources converted once into the cache (``--converter``)
3. ``_load_data``             the data sets, tokenised with the run's tokenizer
4. ``_build_models``          student chunks (+ reference chunks) on this rank's device
5. ``_build_optimizer``       DDP wrappers, Megatron's optimizer and LR scheduler
6. ``_restore_student``       resume a run, or load pretrained weights
7. (reference weights)        the frozen reference, from its checked source
8. ``_connect_schedule``      no-sync, grad finalisation and loss scaling for the schedules
"""

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from megatron_gift.config import is_sft
from megatron_gift.config.schema import JobConfig, Training
from megatron_gift.core import checkpoint, lora, model as models
from megatron_gift.data.dataset import SFTDataset, micro_batch_indices
from megatron_gift.engine import pipeline, sources
from megatron_gift.engine.metrics import MetricsLogger
from megatron_gift.engine.run_spec import RunSpec, portable_config, resolve
from megatron_gift.engine.signals import StopOnSignal
from megatron_gift.errors import UserError
from megatron_gift.loss.objectives import GiftLoss, NextTokenEvaluation
from megatron_gift.platform import console, te
from megatron_gift.platform.cpu import enable_cpu_megatron
from megatron_gift.platform.distributed import init_distributed, local_device
from megatron_gift.platform.run_lock import RunLock
from megatron_gift.tracking.report import run_summary

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a step needs, built once by :func:`setup`."""

    spec: RunSpec
    tf_config: object  # megatron.core TransformerConfig
    chunks: list  # GiftModel per virtual stage
    ddp_chunks: list  # the DDP-wrapped students
    optimizer: object  # megatron.core MegatronOptimizer
    scheduler: OptimizerParamScheduler
    train_data: SFTDataset
    valid_data: Optional[SFTDataset]
    iteration: int
    consumed_samples: int
    micro_batches: int
    lora_base: Optional[str] = None  # LoRA: the Megatron checkpoint of the frozen base

    @property
    def config(self) -> JobConfig:
        return self.spec.config

    @property
    def vocab_size(self) -> int:
        """The real vocab; the model's is padded."""
        return self.spec.config.model.vocab_size


def train(config: DictConfig) -> int:
    """Run the job described by ``config`` (validated, from :mod:`megatron_gift.config`) as this
    process's job: settle it, take the lock on its save directory, join (or make, and then own)
    the process group, train with a :class:`Trainer`, and tear down what it set up. Returns the
    last iteration. Raises UserError for a bad input before any work."""
    console.setup_logging(config.logging.log_level)
    console.quiet_third_party()
    spec = resolve(config)
    if spec.finished:
        log.info(f"the run in {spec.save} already finished: iteration {spec.start_iteration} of "
                 f"{spec.config.training.train_iters}; nothing to do (to train further, raise "
                 "--train-iters with --override-opt-param-scheduler)")
        return spec.start_iteration
    lock = RunLock(spec.save) if spec.save else None
    stop = StopOnSignal(on_exit_at_once=lock.release if lock else lambda: None)
    owns_world = not dist.is_initialized()
    try:
        if owns_world:
            init_distributed()
        if lock is not None:
            _lock_save_dir(lock)
        log.info(console.describe_implementation())
        log.info(spec.describe_places())
        trainer = Trainer(spec)
        try:
            trainer.setup()
            return trainer.run(stop)
        finally:
            trainer.close()
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        if owns_world:
            dist.destroy_process_group()


class Trainer:
    """One training run inside the current process group (set-up, run, close), as torchtitan
    splits it: the world must exist (:func:`train` or a caller makes it), Megatron's
    model-parallel state is set to this run's layout (replacing any other), and :meth:`close`
    tears down only that state, never the world."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.job: Optional[Job] = None

    def setup(self) -> Job:
        """Build the run (:func:`setup`): parallel state, data, models, optimizer, weights."""
        if not dist.is_initialized():
            raise RuntimeError("Trainer.setup needs a process group: call train(), or "
                               "megatron_gift.platform.distributed.init_distributed() first")
        if not torch.cuda.is_available():
            enable_cpu_megatron()  # idempotent; a world made elsewhere may not have it yet
            console.quiet_gpu_advice()
        self.job = setup(self.spec)
        return self.job

    def run(self, stop: Optional[StopOnSignal] = None) -> int:
        """Train to ``train_iters`` or until ``stop`` (:func:`run`); the last iteration."""
        return run(self.job, stop)

    def close(self) -> None:
        """Give back this run's model-parallel state (the process group stays)."""
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        self.job = None


def _lock_save_dir(lock: RunLock) -> None:
    """Global rank 0 takes the lock on ``--save`` for the life of the run; every rank raises
    the same UserError when another live job holds it."""
    refusal = [None]
    if dist.get_rank() == 0:
        try:
            lock.acquire()
        except UserError as error:
            refusal = [str(error)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise UserError(refusal[0])


def setup(spec: RunSpec) -> Job:
    """Parallel state, data, student (+ reference), optimizer; resumes or loads weights."""
    config = spec.config
    _init_parallel_state(config)
    micro_batches = _micro_batches(config)
    converter = config.checkpoint.converter
    student_weights = sources.megatron_checkpoint(spec.student_source, converter)
    reference_weights = sources.megatron_checkpoint(spec.reference_source, converter)
    train_data, valid_data = _load_data(config, spec.tokenizer)
    tf_config, vocab, students, references = _build_models(config, loads=bool(
        spec.resume_from or spec.student_source))
    ddp_chunks, optimizer, scheduler = _build_optimizer(config, tf_config, students)
    arch = checkpoint.architecture(config.model, vocab)
    lora_base = _lora_base(spec, student_weights, reference_weights)
    if lora_base and spec.resume_from is not None:  # the adapters resume onto their base
        checkpoint.load_model_weights(lora_base, [models.unwrap(c) for c in ddp_chunks], arch)
    iteration, consumed = _restore_student(spec, student_weights, ddp_chunks, optimizer,
                                           scheduler, arch)
    if references is not None:
        checkpoint.load_model_weights(reference_weights, references, arch)
    _connect_schedule(tf_config, ddp_chunks, optimizer)
    reference_is_base = config.lora.rank is not None and not is_sft(config)
    chunks = [models.GiftModel(s, r, reference_is_base)
              for s, r in zip(ddp_chunks, references or [None] * len(ddp_chunks))]
    return Job(spec, tf_config, chunks, ddp_chunks, optimizer, scheduler, train_data, valid_data,
               iteration, consumed, micro_batches, lora_base)


def _lora_base(spec: RunSpec, student_weights: Optional[str],
               reference_weights: Optional[str]) -> Optional[str]:
    """A LoRA run's frozen base as a Megatron checkpoint: GIFT's reference (the base itself),
    else the pretrained student, else what the resumed run recorded; None without LoRA."""
    if spec.config.lora.rank is None:
        return None
    recorded = (checkpoint.run_facts(spec.resume_from).get("lora_base")
                if spec.resume_from else None)
    base = reference_weights or student_weights or recorded
    if base is None:
        raise UserError("LoRA needs a base model to put its adapters on: set "
                        "--pretrained-checkpoint")
    return os.path.abspath(base)


def _init_parallel_state(config: JobConfig) -> None:
    """Megatron's model-parallel groups for this run's layout (replacing any there are) and
    the seeds."""
    parallel = config.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size)
    # Megatron-LM's offset: pipeline stages draw different initial weights (TP ranks of a
    # stage share the seed: each builds the full weight and keeps its shard).
    seed = config.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _micro_batches(config: JobConfig) -> int:
    """Micro-batches per step on each data-parallel rank."""
    training = config.training
    dp = parallel_state.get_data_parallel_world_size()
    if training.global_batch_size % (training.micro_batch_size * dp):
        raise UserError(
            f"training.global_batch_size={training.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {training.micro_batch_size} x {dp} "
            "(--global-batch-size, --micro-batch-size)")
    return training.global_batch_size // (training.micro_batch_size * dp)


def _load_data(config: JobConfig, tokenizer) -> tuple[SFTDataset, Optional[SFTDataset]]:
    """The training and validation data sets, tokenised with the run's ``tokenizer``."""
    train_data = _dataset(config, config.data.train_path, tokenizer)
    valid_data = (_dataset(config, config.data.valid_path, tokenizer)
                  if config.data.valid_path else None)
    for name, data in (("train", train_data), ("valid", valid_data)):
        if data is None:
            continue
        _check_token_ids(data, config.model.vocab_size)
        _check_loss_tokens(data, config.model.seq_length)
        for line in _data_report(name, data, config.model.seq_length):
            log.info(line)
    return train_data, valid_data


EMPTIED_WARNING_SHARE = 0.05  # of the samples, truncated to no loss token: one warning line


def _check_loss_tokens(data: SFTDataset, seq_length: int) -> None:
    """Samples that truncation left without a loss token (a prompt as long as the sequence)
    train nothing: all of them is refused, more than :data:`EMPTIED_WARNING_SHARE` warned."""
    if not data.emptied:
        return
    what = (f"{data.emptied} of {data.num_samples} samples in {data.path} keep no response "
            f"token after truncation to seq_length + 1 = {seq_length + 1} tokens (the longest "
            f"prompt has {data.longest_prompt} tokens)")
    fix = ("raise --seq-length, shorten the prompts, or set --overlong reject to refuse "
           "overlong samples")
    if data.emptied == data.num_samples:
        raise UserError(f"{what}: nothing would be trained; {fix}")
    if data.emptied > EMPTIED_WARNING_SHARE * data.num_samples:
        log.warning(f"{what}: they train nothing; {fix}")


def _check_token_ids(data: SFTDataset, vocab_size: int) -> None:
    """Every token id (so every label) lies in the model's vocab: checked once per data set, on
    the host, so that the loss needs no check of its own."""
    if data.max_token_id >= vocab_size:
        raise UserError(f"the data in {data.cache_path} holds token id {data.max_token_id}, "
                        f"outside the model's vocab of {vocab_size}: it was tokenised with "
                        "another tokenizer; pass the model's own (--tokenizer) or clear that "
                        "cache file")


def _build_models(config: JobConfig, loads: bool = False) -> tuple[object, int, list, Optional[list]]:
    """``(TransformerConfig, padded vocab, student chunks, reference chunks or None)``;
    ``loads``: the student's weights are loaded next (resumed or pretrained)."""
    params_dtype = torch.bfloat16 if config.training.bf16 else torch.float32
    # Weights that are loaded next are not initialised first: the reference's always, the
    # student's when it resumes or starts from a pretrained checkpoint.
    tf_config = models.transformer_config(config, params_dtype, initialize=not loads)
    vocab = models.padded_vocab_size(config.model.vocab_size, config)
    device = local_device()
    students = models.build_chunks(config, tf_config, vocab, device)
    te.check_fp8_in_use(tf_config, students, "student")
    if config.lora.rank is not None:
        for student in students:
            lora.freeze_base(student)
        log.info(f"LoRA: {_trainable(students)} trained parameters on this rank, the base "
                 "frozen; the reference is the base itself (adapters off)")
    if is_sft(config) or config.lora.rank is not None:
        log.info(f"precision: {te.describe(tf_config)}")
        return tf_config, vocab, students, None
    reference_config = models.transformer_config(config, params_dtype, initialize=False,
                                                 frozen=True)
    # Under no_grad, TE's fp8_model_init keeps no high-precision copy of FP8 weights (only an
    # optimizer would read it).
    with torch.no_grad():
        references = models.build_chunks(config, reference_config, vocab, device)
    te.check_fp8_in_use(reference_config, references, "reference")
    log.info(f"precision: {te.describe(tf_config, reference_config)}")
    return tf_config, vocab, students, references


def _trainable(chunks: list) -> str:
    count = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    return f"{count:,}"


def _build_optimizer(config: JobConfig, tf_config, students: list) -> tuple[list, object, object]:
    """DDP-wrapped students, Megatron's optimizer over them, and its LR scheduler."""
    parallel = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=parallel.grad_reduce_in_fp32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        fp8_param_gather=config.precision.fp8_param_gather)
    ddp_chunks = [DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=m,
                                          disable_bucketing=k > 0)
                  for k, m in enumerate(students)]
    optimizer = get_megatron_optimizer(_optimizer_config(config, tf_config.params_dtype),
                                       ddp_chunks)
    return ddp_chunks, optimizer, _scheduler(config, optimizer)


def _restore_student(spec: RunSpec, weights: Optional[str], ddp_chunks: list, optimizer,
                     scheduler, arch: dict) -> tuple[int, int]:
    """Resume ``spec.resume_from`` (everything) or load the initial ``weights`` (a Megatron
    checkpoint); returns ``(iteration, consumed_samples)``."""
    if spec.resume_from is not None:
        log.info(f"resuming from {spec.resume_from}")
        iteration, consumed, _ = checkpoint.load_checkpoint(
            spec.resume_from, ddp_chunks, optimizer, scheduler,
            new_schedule=spec.config.optimizer.override_opt_param_scheduler)
        return iteration, consumed
    if weights:
        loaded = checkpoint.load_model_weights(weights, [models.unwrap(c) for c in ddp_chunks],
                                               arch)
        for chunk in ddp_chunks:
            chunk.broadcast_params()
        # FP8 parameters hold the weights quantized: the fp32 master weights start from the
        # checkpoint's tensors instead, as Megatron-LM's --load-main-params-from-ckpt does (the
        # bf16 reference is the unquantized base; a quantized start would differ from it in the
        # tail GIFT keeps). Only the distributed optimizer, which FP8 parameters need, takes them.
        optimizer.reload_model_params(
            state_dict=loaded if spec.config.precision.fp8_param_gather else None)
        log.info(f"student initialised from {spec.student_source}")
    return 0, 0


def _connect_schedule(tf_config, ddp_chunks: list, optimizer) -> None:
    """Give Megatron's schedules the hooks of this model: no-sync for gradient accumulation,
    gradient finalisation across DP/PP, and the optimizer's loss scale."""
    no_sync = [c.no_sync for c in ddp_chunks]
    tf_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    tf_config.finalize_model_grads_func = (
        lambda _, num_tokens, **kw: finalize_model_grads(ddp_chunks, num_tokens, **kw))
    tf_config.grad_scale_func = optimizer.scale_loss


def run(job: Job, stop: Optional[StopOnSignal] = None) -> int:
    """Train from ``job.iteration`` to ``train_iters``, or until ``stop`` is requested (then
    save and return); returns the last iteration. Without ``stop`` (a caller that did its own
    set-up) the stop signals are handled for the duration of the call."""
    if stop is None:
        stop = StopOnSignal()
        try:
            return run(job, stop)
        finally:
            stop.restore()
    config = job.config
    training = config.training
    logger = MetricsLogger(config, training.train_iters, job.iteration,
                           dist.get_rank() == 0)
    stop.start_training(job.chunks[0].device)
    started = time.monotonic()
    log.info(_describe(job))
    log.info(_model_size(job))
    _record_config(job)
    save, last_saved, stopped_by = config.checkpoint.save, job.iteration, None
    try:
        while job.iteration < training.train_iters and stopped_by is None:
            record = _train_step(job)
            job.iteration += 1
            record["iteration"] = job.iteration
            last = job.iteration == training.train_iters
            if job.iteration % config.logging.log_interval == 0 or last:
                logger.log(record)
            if job.valid_data is not None and (job.iteration % training.eval_interval == 0
                                               or last):
                logger.log({"iteration": job.iteration, **_evaluate(job)})
            stopped_by = stop.requested(_time_is_up(training, started)) or (
                "the exit interval" if training.exit_interval
                and job.iteration % training.exit_interval == 0 and not last else None)
            interval = config.checkpoint.save_interval
            if save and (stopped_by or (interval and job.iteration % interval == 0) or last):
                _save(job)
                last_saved = job.iteration
    finally:
        logger.close()
    if stopped_by:
        saved = f"saved to {os.path.abspath(save)}; resume with --load {save}" if save else \
            "not saved (no --save)"
        log.info(f"stopped by {stopped_by} after iteration {job.iteration} of "
                 f"{training.train_iters}: {saved}")
    logging_config = config.logging
    for what, path in (("checkpoints", save if last_saved else None),
                       ("metrics", logging_config.metrics_file),
                       ("tensorboard", logging_config.tensorboard_dir)):
        if path:
            log.info(f"{what}: {os.path.abspath(path)}")
    _summarize(config)
    return job.iteration


def _summarize(config: JobConfig) -> None:
    """Rank 0 prints the run's summary from its metrics file (iterations, wall time of the
    steps, final and best values) and the command that draws it."""
    metrics = config.logging.metrics_file
    if dist.get_rank() != 0 or not metrics or not os.path.isfile(metrics):
        return
    for line in run_summary(metrics):
        log.info(line)
    save = config.checkpoint.save
    own = save and os.path.abspath(metrics) == os.path.join(os.path.abspath(save), "metrics.jsonl")
    out = os.path.join(save, "report") if save else "REPORT_DIR"
    log.info(f"draw it: megatron-gift report {save if own else metrics} --out {out}")


def _record_config(job: Job) -> None:
    """Rank 0 writes the resolved config of this start to
    ``SAVE/configs/start-<iteration>-<time>.yaml``: one file per start of the run."""
    save = job.config.checkpoint.save
    if not save or dist.get_rank() != 0:
        return
    directory = os.path.join(save, "configs")
    os.makedirs(directory, exist_ok=True)
    name = f"start-{job.iteration:07d}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    OmegaConf.save(OmegaConf.structured(job.config), os.path.join(directory, name))


def _time_is_up(training: Training, started: float) -> bool:
    """Whether this rank has trained ``exit_duration_in_mins`` (Megatron-LM's flag)."""
    minutes = training.exit_duration_in_mins
    return minutes is not None and time.monotonic() - started >= 60 * minutes


def _train_step(job: Job) -> dict:
    config = job.config
    start = time.perf_counter()
    for chunk in job.ddp_chunks:
        chunk.zero_grad_buffer()
    job.optimizer.zero_grad()
    batches = _batches(job, job.train_data, job.consumed_samples, shuffle_seed=config.training.seed)
    loss = GiftLoss(config.gift.beta, config.gift.smooth_lambda, job.vocab_size,
                    config.gift.loss_implementation, config.gift.head,
                    config.gift.head_chunk_tokens, _head_accumulates_into_main_grad(job),
                    config.gift.soft_sft_weight)
    for chunk in job.chunks:
        chunk.head = loss.head
    step = pipeline.forward_step_func(loss, pipeline.causal_attention_mask, thd=_packs_thd(config))
    reports = _run_schedule(job, batches, forward_only=False, step=step)
    _, grad_norm, _ = job.optimizer.step()
    job.scheduler.step(increment=1)
    job.consumed_samples += config.training.global_batch_size
    totals = _reduce_reports(reports, loss.metrics, job.chunks[0].device)
    totals.update(_moe_load_balancing(job, len(batches)))
    elapsed = time.perf_counter() - start
    loss_tokens = totals.pop("_tokens")
    processed = config.training.global_batch_size * config.model.seq_length
    return {**totals, "lr": job.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": processed, "loss_tokens": int(loss_tokens), "step_time": elapsed,
            "tokens_per_s": processed / elapsed, "loss_tokens_per_s": loss_tokens / elapsed}


def _moe_load_balancing(job: Job, micro_batches: int) -> dict:
    """``{"moe_aux_loss": ...}``: the student's load-balancing loss of this step (before its
    coefficient; mean over MoE layers and micro-batches, reduced over ranks), from the tracker
    Megatron-Core's routers write to (transformer/moe/moe_logging.py), which it then clears.
    Empty for a dense model or a zero coefficient. Every rank calls it (the tracker reduces
    over pipeline stages)."""
    model, training = job.config.model, job.config.training
    if not model.num_moe_experts or training.moe_aux_loss_coeff == 0 or (
            training.moe_router_load_balancing_type == "none"):
        return {}
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    name = {"aux_loss": "load_balancing_loss",
            "seq_aux_loss": "seq_load_balancing_loss"}[training.moe_router_load_balancing_type]
    totals: dict = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / micro_batches, iteration=job.iteration, total_loss_dict=totals,
        force_initialize=True, track_names=[name], num_layers=model.num_layers,
        moe_layer_freq=job.tf_config.moe_layer_freq)
    return {"moe_aux_loss": float(totals.get(name, float("nan")))}


def _evaluate(job: Job) -> dict:
    """Plain next-token cross-entropy and accuracy of the student on the response tokens."""
    config = job.config
    loss = NextTokenEvaluation(job.vocab_size, config.gift.head, config.gift.head_chunk_tokens)
    for chunk in job.chunks:  # the metrics read the student alone: the reference stays idle
        chunk.student.eval()
        chunk.use_reference = loss.uses_reference
        chunk.head = loss.head
    sums = {key: [0.0, 0.0] for key in loss.metrics}
    step = pipeline.forward_step_func(loss, pipeline.causal_attention_mask, thd=_packs_thd(config))
    with torch.no_grad():
        for k in range(config.training.eval_iters):
            batches = _batches(job, job.valid_data, k * config.training.global_batch_size,
                               shuffle_seed=None)
            reports = _run_schedule(job, batches, forward_only=True, step=step)
            reduced = _reduce_reports(reports, loss.metrics, job.chunks[0].device, as_sums=True)
            for key, (total, count) in reduced.items():
                sums[key][0] += total
                sums[key][1] += count
    for chunk in job.chunks:
        chunk.student.train()
        chunk.use_reference = True
    return {k: total / max(count, 1) for k, (total, count) in sums.items()}


def _head_accumulates_into_main_grad(job: Job) -> bool:
    """Whether the fused head adds the output weight's gradient into its ``main_grad``:
    where Megatron-Core's gradient-accumulation fusion is on (its linear layers do the same),
    except for a tied output weight on the stage that also holds the embedding. There the
    embedding's gradient reaches the same parameter, and DDP's hook, told the gradient is in
    ``main_grad`` already, would drop the embedding's share; the head returns its gradient."""
    chunk = job.chunks[-1]
    tied = not job.config.model.untie_embeddings_and_output_weights
    return bool(chunk.config.gradient_accumulation_fusion) and not (tied and chunk.pre_process)


def _batches(job: Job, data: SFTDataset, consumed: int, shuffle_seed: Optional[int]) -> list:
    training = job.config.training
    indices = micro_batch_indices(
        len(data), consumed, training.global_batch_size, training.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
        seed=shuffle_seed)
    return [data.batch(i) for i in indices]


def _run_schedule(job: Job, batches: list, forward_only: bool, step) -> list:
    config = job.config
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    with_reference = job.chunks[0].runs_reference
    adjust = None
    if with_reference and vpp is None and config.parallel.pipeline_model_parallel_size > 1:
        adjust = pipeline.shapes_with_reference(config.model.hidden_size)
    data_iterator = [iter(batches) for _ in job.chunks] if vpp else iter(batches)
    seq_length, micro_batch_size = config.model.seq_length, config.training.micro_batch_size
    if _packs_thd(config):  # a micro-batch travels as one row of its b * s tokens
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data_iterator, model=job.chunks,
        num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust)


def _packs_thd(config: JobConfig) -> bool:
    """Packed data on Transformer Engine's layers: the "thd" format (TE ignores the local
    layers' block-diagonal mask); the local layers take the mask."""
    return config.data.pack and te.available()


def _reduce_reports(reports: list, keys: tuple, device: torch.device,
                    as_sums: bool = False) -> dict:
    """Sum ``[sum, count]`` reports of the metrics ``keys`` over micro-batches and ranks, as a
    token-mean loss declares them (:mod:`megatron_gift.loss.objectives`); means unless
    ``as_sums``.

    Only the last pipeline stage has reports, and every TP rank there the same ones: TP rank 0
    of the last stage contributes, every rank receives the totals.
    """
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    if reports and parallel_state.get_tensor_model_parallel_rank() == 0:
        for report in reports:
            totals += torch.stack([report[k].detach().double() for k in keys])
    dist.all_reduce(totals)
    totals = totals.cpu()
    if as_sums:
        return {k: (float(totals[i, 0]), float(totals[i, 1])) for i, k in enumerate(keys)}
    result = {k: float(totals[i, 0] / max(float(totals[i, 1]), 1.0)) for i, k in enumerate(keys)}
    result["_tokens"] = float(totals[0, 1])
    return result


def _save(job: Job) -> None:
    """Save the step; a write that fails (a full disk, a lost mount) is one line, and the
    tracker keeps naming the last complete checkpoint."""
    spec, config = job.spec, job.config
    run_facts = {"config": portable_config(config), "layout": checkpoint.layout(),
                 "architecture": checkpoint.architecture(
                     config.model, models.unwrap(job.ddp_chunks[0]).vocab_size),
                 "reference_source": spec.reference_source, "fingerprints": spec.fingerprints,
                 "lora_base": job.lora_base, **spec.conversion}
    save = config.checkpoint.save
    _gather_params_before_save(job)
    try:
        if dist.get_rank() == 0:  # before the tracker names the checkpoint: exports need them
            sources.copy_assets(sources.model_source(config), save)
        checkpoint.save_checkpoint(save, job.iteration, job.ddp_chunks, job.optimizer,
                                   job.scheduler, job.consumed_samples, run_facts)
    except (Exception, CheckpointException) as error:  # the latter is a BaseException
        why = _why_save_failed(save, error)
        if why is None:
            raise
        kept = checkpoint.latest_checkpoint(save)
        raise UserError(f"saving iteration {job.iteration} to {save} failed: {why}; "
                        + (f"the newest complete checkpoint is still {kept}: free the space "
                           f"and resume with --load {save}" if kept else
                           "no complete checkpoint was written: free the space and start "
                           "again")) from None


def _gather_params_before_save(job: Job) -> None:
    """With ``--overlap-param-gather`` the step updates each DP rank's shard and leaves the
    all-gather to the next forward's pre-hooks, so the parameters are stale until then: gather
    them now, as Megatron-LM's ``force_param_sync`` does before every save (a save by signal,
    exit interval or save interval would otherwise write the previous step's shards of the
    other DP ranks)."""
    if not job.config.parallel.overlap_param_gather:
        return
    job.optimizer.prepare_model_params_for_param_sync()
    for chunk in job.ddp_chunks:
        chunk.start_param_sync(force_sync=True)


def _why_save_failed(save: str, error: BaseException) -> Optional[str]:
    """What the file system did to a save (an OSError, or a full disk behind the exception
    torch.distributed.checkpoint wraps its writers' failures in), or None for anything else."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    free = shutil.disk_usage(save).free
    newest = checkpoint.latest_checkpoint(save)
    needed = sum(os.path.getsize(os.path.join(newest, name)) for name in os.listdir(newest)) \
        if newest else 1 << 20
    if free < needed:
        return f"the file system is full ({free} bytes free, a checkpoint takes {needed})"
    return None


def _dataset(config: JobConfig, path: Optional[str], tokenizer) -> SFTDataset:
    if path is None:
        raise UserError("data.train_path (--train-path) is required")
    data = config.data
    return SFTDataset(path, tokenizer, config.model.seq_length, prompt_field=data.prompt_field,
                      response_field=data.response_field, messages_field=data.messages_field,
                      text_field=data.text_field, split=data.split, overlong=data.overlong,
                      malformed=data.malformed, pack=data.pack, cache_dir=data.cache_dir)


def _data_report(name: str, data: SFTDataset, seq_length: int) -> list[str]:
    """Log lines on what was read into ``data`` for the ``name`` split."""
    kept = (f"{data.num_samples} samples packed into {len(data)} sequences" if data.pack
            else f"{data.num_samples} samples")
    lines = [f"data ({name}): {data.num_records} records -> {kept}; "
             f"{'tokenised into' if data.built else 'read from'} cache {data.cache_path}"]
    if data.truncated:
        lines.append(f"data ({name}): cut {data.truncated} of {data.num_samples} samples to "
                     f"seq_length + 1 = {seq_length + 1} tokens (data.overlong=truncate)")
    if data.skipped:
        lines.append(f"data ({name}): skipped {data.skipped} malformed records "
                     f"(data.malformed=skip), first: " + "; ".join(data.skipped_examples))
    return lines


def _optimizer_config(config: JobConfig, params_dtype: torch.dtype) -> OptimizerConfig:
    opt = config.optimizer
    return OptimizerConfig(
        optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, sgd_momentum=opt.sgd_momentum,
        clip_grad=opt.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer)


def _scheduler(config: JobConfig, optimizer) -> OptimizerParamScheduler:
    opt, iters = config.optimizer, config.training.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.lr_warmup_iters else opt.lr, max_lr=opt.lr,
        min_lr=opt.min_lr, lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(iters, opt.lr_warmup_iters + 1), lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant", override_opt_param_scheduler=opt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not opt.override_opt_param_scheduler)


def _model_size(job: Job) -> str:
    """The models' size: layers, the student's parameters (of which trainable) and the
    reference's, over every TP and PP rank (a TP-replicated parameter counted once)."""
    student = [models.unwrap(chunk.student) for chunk in job.chunks]
    reference = [chunk.reference for chunk in job.chunks if chunk.reference is not None]
    counts = torch.tensor([_parameters(student), _parameters(student, trainable=True),
                           _parameters(reference)], dtype=torch.float64,
                          device=job.chunks[0].device)
    dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    total, trainable, frozen = (float(c) for c in counts)
    text = (f"model: {job.config.model.num_layers} layers; student {_count(total)} "
            f"parameters, {'all' if trainable == total else _count(trainable)} trainable")
    return text + (f"; reference {_count(frozen)}, frozen" if reference else "")


def _count(n: float) -> str:
    """``70.55 B``, ``494.03 M`` or, below a million, exact: ``31,872``."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{int(n):,}"


def _parameters(modules: list, trainable: bool = False) -> int:
    """This rank's parameters of ``modules``: TP-sharded ones, and replicated ones on TP rank 0
    only (so a sum over the model-parallel group counts each once)."""
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    return sum(p.numel() for m in modules for p in m.parameters()
               if (first or getattr(p, "tensor_model_parallel", False))
               and (p.requires_grad or not trainable))


def _describe(job: Job) -> str:
    config, p = job.config, job.config.parallel
    gift = config.gift
    target = (f"soft SFT w={gift.soft_sft_weight}" if gift.soft_sft_weight is not None
              else f"GIFT beta={gift.beta}")
    mode = "SFT (beta=inf, no reference)" if is_sft(config) else (
        f"{target} lambda={gift.smooth_lambda}, reference {job.spec.reference_source}")
    vpp = p.virtual_pipeline_model_parallel_size
    return (f"{mode}; TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}"
            f"{f' VPP={vpp}' if vpp else ''} DP={parallel_state.get_data_parallel_world_size()}; "
            f"{len(job.train_data)} sequences, {job.micro_batches} micro-batches of "
            f"{config.training.micro_batch_size} per step; starting at iteration {job.iteration}")
