"""The GIFT training loop on Megatron-Core: set-up in named stages, steps, evaluation,
checkpoints, signals.

``train(config)`` runs one job under ``torchrun`` (or as a single process): tensor/pipeline/
data parallel as configured, Megatron's DDP, optimizer and LR schedule, the co-located frozen
reference (none when ``beta = inf``), checkpoints that resume exactly and reshard, and a clean
save-and-exit on SIGTERM or Ctrl-C (:mod:`.signals`). :func:`setup` builds a :class:`Job` stage by stage:

1. ``_init_parallel_state``   Megatron's TP/PP/DP groups, seeds; ``_check_resume``: a run to
                              continue holds training state, its schedule is unchanged (or
                              ``--override-opt-param-scheduler``)
2. ``_reference_source``      where the reference comes from, checked against the student's
                              source before anything is converted, built or written; the
                              converter for HF sources (``--converter``)
3. ``_load_data``             tokenizer, the model section completed from the sources, data sets
4. ``_build_models``          student chunks (+ reference chunks) on this rank's device
5. ``_build_optimizer``       DDP wrappers, Megatron's optimizer and LR scheduler
6. ``_restore_student``       resume a run, or load pretrained weights
7. (reference weights)        the frozen reference, from its checked source
8. ``_connect_schedule``      no-sync, grad finalisation and loss scaling for the schedules
"""

import logging
import math
import os
import random
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

from megatron_gift.config import from_container, is_sft
from megatron_gift.core import checkpoint, model as models
from megatron_gift.data.dataset import SFTDataset, micro_batch_indices
from megatron_gift.engine import pipeline, sources
from megatron_gift.engine.job import saved_config
from megatron_gift.engine.metrics import MetricsLogger
from megatron_gift.engine.signals import StopOnSignal
from megatron_gift.errors import UserError
from megatron_gift.hf.architecture import hf_assets
from megatron_gift.loss.passes import triton_can_run
from megatron_gift.platform import console, te
from megatron_gift.platform.distributed import (init_distributed, local_device,
                                                world_size_from_env)
from megatron_gift.platform.run_lock import RunLock

log = logging.getLogger(__name__)
REPORTED = ("loss", "student_entropy", "target_mass", "student_label_prob")
# What a resumed run may change only with --override-opt-param-scheduler.
SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.lr_warmup_iters",
                 "optimizer.lr_decay_style", "training.train_iters")


@dataclass
class Job:
    """Everything a step needs, built once by :func:`setup`."""

    config: DictConfig
    tf_config: object  # megatron.core TransformerConfig
    chunks: list  # GiftModel per virtual stage
    ddp_chunks: list  # the DDP-wrapped students
    optimizer: object  # megatron.core MegatronOptimizer
    scheduler: OptimizerParamScheduler
    train_data: SFTDataset
    valid_data: Optional[SFTDataset]
    iteration: int
    consumed_samples: int
    reference_source: Optional[str]
    conversion: dict  # the HF sources converted and the converter: sources.conversion
    micro_batches: int
    vocab_size: int  # the real vocab; the model's is padded


def train(config: DictConfig) -> int:
    """Run the job described by ``config`` (validated, from :mod:`megatron_gift.config`);
    returns the last iteration. Raises UserError for a bad layout before any work."""
    console.setup_logging(config.logging.log_level)
    console.quiet_third_party()
    _check_before_start(config)
    lock = RunLock(config.checkpoint.save) if config.checkpoint.save else None
    stop = StopOnSignal(on_exit_at_once=lock.release if lock else lambda: None)
    try:
        init_distributed()
        if not torch.cuda.is_available():
            console.quiet_gpu_advice()
        if lock is not None:
            _lock_save_dir(lock)
        log.info(console.describe_implementation())
        job = setup(config)
        return run(job, stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


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


def setup(config: DictConfig) -> Job:
    """Parallel state, data, student (+ reference), optimizer; resumes or loads weights."""
    _init_parallel_state(config)
    micro_batches = _micro_batches(config)
    _check_resume(config)
    reference_source = None if is_sft(config) else _reference_source(config)
    conversion = sources.conversion(config, reference_source)
    config, train_data, valid_data = _load_data(config)
    tf_config, vocab, students, references = _build_models(config)
    ddp_chunks, optimizer, scheduler = _build_optimizer(config, tf_config, students)
    arch = checkpoint.architecture(config.model, vocab)
    iteration, consumed = _restore_student(config, ddp_chunks, optimizer, scheduler, arch)
    if references is not None:
        checkpoint.load_model_weights(
            sources.megatron_checkpoint(reference_source, config.checkpoint.converter),
            references, arch)
    _connect_schedule(tf_config, ddp_chunks, optimizer)
    chunks = [models.GiftModel(s, r)
              for s, r in zip(ddp_chunks, references or [None] * len(ddp_chunks))]
    return Job(config, tf_config, chunks, ddp_chunks, optimizer, scheduler, train_data, valid_data,
               iteration, consumed, reference_source, conversion, micro_batches,
               config.model.vocab_size)


def _init_parallel_state(config: DictConfig) -> None:
    parallel = config.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size)
    # Megatron-LM's offset: pipeline stages draw different initial weights (TP ranks of a
    # stage share the seed: each builds the full weight and keeps its shard).
    seed = config.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _micro_batches(config: DictConfig) -> int:
    """Micro-batches per step on each data-parallel rank."""
    training = config.training
    dp = parallel_state.get_data_parallel_world_size()
    if training.global_batch_size % (training.micro_batch_size * dp):
        raise UserError(
            f"training.global_batch_size={training.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {training.micro_batch_size} x {dp} "
            "(--global-batch-size, --micro-batch-size)")
    return training.global_batch_size // (training.micro_batch_size * dp)


def _load_data(config: DictConfig) -> tuple[DictConfig, SFTDataset, Optional[SFTDataset]]:
    """The tokenizer, the model section completed from the run's sources, and the data sets."""
    tokenizer = _load_tokenizer(config.model.tokenizer or hf_assets(sources.model_source(config)))
    config = sources.resolve_model(config, len(tokenizer))
    train_data = _dataset(config, config.data.train_path, tokenizer)
    valid_data = (_dataset(config, config.data.valid_path, tokenizer)
                  if config.data.valid_path else None)
    for name, data in (("train", train_data), ("valid", valid_data)):
        if data is None:
            continue
        _check_token_ids(data, config.model.vocab_size)
        for line in _data_report(name, data, config.model.seq_length):
            log.info(line)
    return config, train_data, valid_data


def _check_token_ids(data: SFTDataset, vocab_size: int) -> None:
    """Every token id (so every label) lies in the model's vocab: checked once per data set, on
    the host, so that the loss needs no check of its own."""
    if data.max_token_id >= vocab_size:
        raise UserError(f"the data in {data.cache_path} holds token id {data.max_token_id}, "
                        f"outside the model's vocab of {vocab_size}: it was tokenised with "
                        "another tokenizer; pass the model's own (--tokenizer) or clear that "
                        "cache file")


def _build_models(config: DictConfig) -> tuple[object, int, list, Optional[list]]:
    """``(TransformerConfig, padded vocab, student chunks, reference chunks or None)``."""
    params_dtype = torch.bfloat16 if config.training.bf16 else torch.float32
    # Weights that are loaded next are not initialised first: the reference's always, the
    # student's when it resumes or starts from a pretrained checkpoint.
    student_loads = bool(config.checkpoint.pretrained_checkpoint
                         or checkpoint.latest_checkpoint(config.checkpoint.load))
    tf_config = models.transformer_config(config, params_dtype, initialize=not student_loads)
    vocab = models.padded_vocab_size(config.model.vocab_size, config)
    device = local_device()
    students = models.build_chunks(config, tf_config, vocab, device)
    te.check_fp8_in_use(tf_config, students, "student")
    if is_sft(config):
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


def _build_optimizer(config: DictConfig, tf_config, students: list) -> tuple[list, object, object]:
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


def _check_resume(config: DictConfig) -> None:
    """On resume: ``--load`` must hold a training checkpoint (not weights only), and a changed
    learning-rate schedule is refused unless the run says to take it (Megatron-Core would keep
    the checkpoint's schedule, and not find its param groups under a new lr)."""
    saved = saved_config(config.checkpoint.load)
    if saved is None or config.optimizer.override_opt_param_scheduler:
        return
    saved = from_container(saved)
    changed = [f"{key} {OmegaConf.select(saved, key)} -> {OmegaConf.select(config, key)}"
               for key in SCHEDULE_KEYS
               if OmegaConf.select(saved, key) != OmegaConf.select(config, key)]
    if changed:
        raise UserError(f"resuming {config.checkpoint.load} with a changed schedule "
                        f"({'; '.join(changed)}): pass --override-opt-param-scheduler to take "
                        "the new values, or drop the changes to continue the saved schedule")


def _reference_source(config: DictConfig) -> str:
    """The frozen reference's source: ``--reference-load``, else the resumed run's, else the
    pretrained checkpoint (never the run's own checkpoint: the reference is the base model).
    Refused when it differs from the student's source in dtype, vocab or architecture (read
    from configs, before any conversion)."""
    resumed = checkpoint.latest_checkpoint(config.checkpoint.load)
    recorded = checkpoint.run_facts(resumed).get("reference_source") if resumed else None
    pretrained = config.checkpoint.pretrained_checkpoint
    source = config.gift.reference_load or recorded or pretrained
    if source is None:
        raise UserError("GIFT with finite beta needs a reference: set --reference-load or "
                        "--pretrained-checkpoint (or --gift-beta inf for plain SFT)")
    sources.check_reference_matches(pretrained, source)
    return source


def _restore_student(config: DictConfig, ddp_chunks: list, optimizer, scheduler,
                     arch: dict) -> tuple[int, int]:
    """Resume from ``--load`` (everything) or load ``--pretrained-checkpoint`` (weights);
    returns ``(iteration, consumed_samples)``."""
    resume_from = checkpoint.latest_checkpoint(config.checkpoint.load)
    if resume_from is not None:
        log.info(f"resuming from {resume_from}")
        iteration, consumed, _ = checkpoint.load_checkpoint(
            resume_from, ddp_chunks, optimizer, scheduler,
            new_schedule=config.optimizer.override_opt_param_scheduler)
        return iteration, consumed
    pretrained = config.checkpoint.pretrained_checkpoint
    if pretrained:
        source = sources.megatron_checkpoint(pretrained, config.checkpoint.converter)
        checkpoint.load_model_weights(source, [models.unwrap(c) for c in ddp_chunks], arch)
        for chunk in ddp_chunks:
            chunk.broadcast_params()
        optimizer.reload_model_params()
        log.info(f"student initialised from {pretrained}")
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
    logger = MetricsLogger(config.logging, training.train_iters, job.iteration,
                           dist.get_rank() == 0)
    stop.start_training(job.chunks[0].device)
    started = time.monotonic()
    log.info(_describe(job))
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
    return job.iteration


def _record_config(job: Job) -> None:
    """Rank 0 writes the resolved config of this start to
    ``SAVE/configs/start-<iteration>-<time>.yaml``: one file per start of the run."""
    save = job.config.checkpoint.save
    if not save or dist.get_rank() != 0:
        return
    directory = os.path.join(save, "configs")
    os.makedirs(directory, exist_ok=True)
    name = f"start-{job.iteration:07d}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    OmegaConf.save(job.config, os.path.join(directory, name))


def _time_is_up(training: DictConfig, started: float) -> bool:
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
    step = pipeline.forward_step_func(config.gift.beta, config.gift.smooth_lambda,
                                      pipeline.causal_attention_mask, job.vocab_size,
                                      thd=_packs_thd(config),
                                      implementation=config.gift.loss_implementation)
    reports = _run_schedule(job, batches, forward_only=False, step=step)
    _, grad_norm, _ = job.optimizer.step()
    job.scheduler.step(increment=1)
    job.consumed_samples += config.training.global_batch_size
    totals = _reduce_reports(reports, REPORTED, job.chunks[0].device)
    elapsed = time.perf_counter() - start
    loss_tokens = totals.pop("_tokens")
    processed = config.training.global_batch_size * config.model.seq_length
    return {**totals, "lr": job.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": processed, "loss_tokens": int(loss_tokens), "step_time": elapsed,
            "tokens_per_s": processed / elapsed, "loss_tokens_per_s": loss_tokens / elapsed}


def _evaluate(job: Job) -> dict:
    """Plain next-token cross-entropy and accuracy of the student on the response tokens."""
    config = job.config
    for chunk in job.chunks:  # the metrics read the student alone: the reference stays idle
        chunk.student.eval()
        chunk.use_reference = False
    sums = {"valid_ce": [0.0, 0.0], "valid_accuracy": [0.0, 0.0]}
    step = pipeline.forward_step_func(math.inf, 0.0, pipeline.causal_attention_mask,
                                      job.vocab_size, evaluate=True, thd=_packs_thd(config))
    with torch.no_grad():
        for k in range(config.training.eval_iters):
            batches = _batches(job, job.valid_data, k * config.training.global_batch_size,
                               shuffle_seed=None)
            reports = _run_schedule(job, batches, forward_only=True, step=step)
            reduced = _reduce_reports(reports, tuple(sums), job.chunks[0].device, as_sums=True)
            for key, (total, count) in reduced.items():
                sums[key][0] += total
                sums[key][1] += count
    for chunk in job.chunks:
        chunk.student.train()
        chunk.use_reference = True
    return {k: sums[k][0] / max(sums[k][1], 1) for k in ("valid_ce", "valid_accuracy")}


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


def _packs_thd(config: DictConfig) -> bool:
    """Packed data on Transformer Engine's layers: the "thd" format (TE ignores the local
    layers' block-diagonal mask); the local layers take the mask."""
    return config.data.pack and te.available()


def _reduce_reports(reports: list, keys: tuple, device: torch.device,
                    as_sums: bool = False) -> dict:
    """Sum ``[sum, count]`` reports over micro-batches and ranks; means unless ``as_sums``.

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
    config = job.config
    run_facts = {"config": OmegaConf.to_container(config), "layout": checkpoint.layout(),
                 "architecture": checkpoint.architecture(
                     config.model, models.unwrap(job.ddp_chunks[0]).vocab_size),
                 "reference_source": job.reference_source, **job.conversion}
    checkpoint.save_checkpoint(config.checkpoint.save, job.iteration, job.ddp_chunks,
                               job.optimizer, job.scheduler, job.consumed_samples, run_facts)
    if dist.get_rank() == 0:
        sources.copy_assets(sources.model_source(config), config.checkpoint.save)


def _check_before_start(config: DictConfig) -> None:
    """Facts that need no process group: every path the run reads is there, the layout fits
    the world, the device can run it."""
    te.refuse_fp8_without_te(config)
    sources.check_paths(config)
    parallel, cuda = config.parallel, torch.cuda.is_available()
    if parallel.use_distributed_optimizer and not cuda:
        raise UserError("parallel.use_distributed_optimizer needs CUDA: Megatron-Core's "
                        "DistributedOptimizer accepts only CUDA parameters "
                        "(drop --use-distributed-optimizer)")
    if parallel.context_parallel_size > 1 and not (cuda and te.available()):
        raise UserError(f"parallel.context_parallel_size={parallel.context_parallel_size} needs "
                        "Transformer Engine's attention on CUDA, which this machine lacks "
                        "(--context-parallel-size 1)")
    if config.gift.loss_implementation == "triton":
        why_not = triton_can_run(torch.device("cuda" if cuda else "cpu"))
        if why_not:
            raise UserError(f"gift.loss_implementation=triton cannot run here: {why_not} "
                            "(--gift-loss-implementation auto)")
    world = world_size_from_env()
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if world % (tp * pp * cp):
        raise UserError(f"world size {world} is not divisible by tensor x pipeline x context "
                        f"parallel size = {tp} x {pp} x {cp} (--tensor-model-parallel-size, "
                        "--pipeline-model-parallel-size, --context-parallel-size, "
                        "torchrun --nproc-per-node)")


def _load_tokenizer(path: Optional[str]):
    from transformers import AutoTokenizer

    from megatron_gift.data.synthetic import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(path or TOKENIZER_DIR)


def _dataset(config: DictConfig, path: Optional[str], tokenizer) -> SFTDataset:
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


def _optimizer_config(config: DictConfig, params_dtype: torch.dtype) -> OptimizerConfig:
    opt = config.optimizer
    return OptimizerConfig(
        optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, sgd_momentum=opt.sgd_momentum,
        clip_grad=opt.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer)


def _scheduler(config: DictConfig, optimizer) -> OptimizerParamScheduler:
    opt, iters = config.optimizer, config.training.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.lr_warmup_iters else opt.lr, max_lr=opt.lr,
        min_lr=opt.min_lr, lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(iters, opt.lr_warmup_iters + 1), lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant", override_opt_param_scheduler=opt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not opt.override_opt_param_scheduler)


def _describe(job: Job) -> str:
    config, p = job.config, job.config.parallel
    mode = "SFT (beta=inf, no reference)" if is_sft(config) else (
        f"GIFT beta={config.gift.beta} lambda={config.gift.smooth_lambda}, reference "
        f"{job.reference_source}")
    vpp = p.virtual_pipeline_model_parallel_size
    return (f"{mode}; TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}"
            f"{f' VPP={vpp}' if vpp else ''} DP={parallel_state.get_data_parallel_world_size()}; "
            f"{len(job.train_data)} sequences, {job.micro_batches} micro-batches of "
            f"{config.training.micro_batch_size} per step; starting at iteration {job.iteration}")
