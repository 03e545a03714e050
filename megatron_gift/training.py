"""The GIFT training loop on Megatron-Core: set-up, steps, evaluation, checkpoints, signals.

``train(config)`` runs one job under ``torchrun`` (or as a single process): tensor/pipeline/
data parallel as configured, Megatron's DDP, optimizer and LR schedule, the co-located frozen
reference (none when ``beta = inf``), checkpoints that resume exactly and reshard, and a clean
save-and-exit on SIGTERM.
"""

import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from megatron_gift import checkpoint, model as models, pipeline, sources
from megatron_gift.config import is_sft
from megatron_gift.hf_architecture import hf_assets
from megatron_gift.data import SFTDataset, micro_batch_indices
from megatron_gift.metrics import MetricsLogger


@dataclass
class Job:
    """Everything a step needs, built once by :func:`setup`."""

    config: object
    tf_config: object
    chunks: list  # GiftModel per virtual stage
    ddp_chunks: list  # the DDP-wrapped students
    optimizer: object
    scheduler: object
    train_data: SFTDataset
    valid_data: object
    iteration: int
    consumed_samples: int
    reference_source: object
    micro_batches: int
    vocab_size: int  # the real vocab; the model's is padded


def train(config):
    """Run the job described by ``config`` (a validated OmegaConf from megatron_gift.config)."""
    _check_before_start(config)
    _init_distributed()
    try:
        job = setup(config)
        return run(job)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def setup(config):
    """Parallel state, data, student (+ reference), optimizer; resumes or loads weights."""
    tp = config.parallel.tensor_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.parallel.virtual_pipeline_model_parallel_size)
    seed = config.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    dp = parallel_state.get_data_parallel_world_size()
    training = config.training
    if training.global_batch_size % (training.micro_batch_size * dp):
        raise ValueError(
            f"training.global_batch_size={training.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {training.micro_batch_size} x {dp}")
    micro_batches = training.global_batch_size // (training.micro_batch_size * dp)

    pretrained = config.checkpoint.pretrained_checkpoint
    tokenizer = _load_tokenizer(config.model.tokenizer
                                or hf_assets(sources.model_source(config)))
    config = sources.resolve_model(config, len(tokenizer))
    train_data = _dataset(config, config.data.train_path, tokenizer)
    valid_data = _dataset(config, config.data.valid_path, tokenizer) if config.data.valid_path else None

    params_dtype = torch.bfloat16 if training.bf16 else torch.float32
    tf_config = models.transformer_config(config, params_dtype)
    vocab = models.padded_vocab_size(config.model.vocab_size, config)
    arch = checkpoint.architecture(config.model, vocab)
    device = _local_device()
    students = models.build_chunks(config, tf_config, vocab, device)
    references = None if is_sft(config) else models.build_chunks(config, tf_config, vocab, device)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=config.parallel.use_distributed_optimizer)
    ddp_chunks = [DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=m,
                                          disable_bucketing=k > 0)
                  for k, m in enumerate(students)]
    optimizer = get_megatron_optimizer(_optimizer_config(config, params_dtype), ddp_chunks)
    scheduler = _scheduler(config, optimizer)

    iteration, consumed, resumed_run = 0, 0, None
    resume_from = checkpoint.latest_checkpoint(config.checkpoint.load)
    if resume_from is not None:
        iteration, consumed, resumed_run = checkpoint.load_checkpoint(
            resume_from, ddp_chunks, optimizer, scheduler)
    elif pretrained or config.checkpoint.load:
        source = sources.megatron_checkpoint(pretrained or config.checkpoint.load)
        checkpoint.load_model_weights(source, students, arch)
        for chunk in ddp_chunks:
            chunk.broadcast_params()
        optimizer.reload_model_params()

    reference_source = None
    if references is not None:
        reference_source = (config.gift.reference_load
                            or (resumed_run or {}).get("reference_source")
                            or pretrained or config.checkpoint.load)
        if reference_source is None:
            raise ValueError("GIFT with finite beta needs a reference: set --reference-load or "
                             "--pretrained-checkpoint (or --gift-beta inf for plain SFT)")
        sources.check_reference_matches(pretrained, reference_source)
        checkpoint.load_model_weights(sources.megatron_checkpoint(reference_source), references,
                                      arch)

    tf_config.no_sync_func = [c.no_sync for c in ddp_chunks]
    if len(ddp_chunks) == 1:
        tf_config.no_sync_func = tf_config.no_sync_func[0]
    tf_config.finalize_model_grads_func = (
        lambda _, num_tokens, **kw: finalize_model_grads(ddp_chunks, num_tokens, **kw))
    tf_config.grad_scale_func = optimizer.scale_loss
    chunks = [models.GiftModel(s, r) for s, r in zip(ddp_chunks, references or [None] * len(ddp_chunks))]
    return Job(config, tf_config, chunks, ddp_chunks, optimizer, scheduler, train_data, valid_data,
               iteration, consumed, reference_source, micro_batches, config.model.vocab_size)


def run(job):
    """Train from ``job.iteration`` to ``train_iters``; returns the last iteration."""
    config = job.config
    training = config.training
    is_rank0 = dist.get_rank() == 0
    logger = MetricsLogger(config.logging, training.train_iters, job.iteration, is_rank0)
    stop = _StopOnSignal(job.chunks[0].device)
    for name, data in (("train", job.train_data), ("valid", job.valid_data)):
        for line in _data_report(name, data, config.model.seq_length) if data is not None else ():
            logger.message(line)
    logger.message(_describe(job))
    save, last_saved = config.checkpoint.save, job.iteration
    try:
        while job.iteration < training.train_iters:
            record = _train_step(job)
            job.iteration += 1
            record["iteration"] = job.iteration
            if job.iteration % config.logging.log_interval == 0 or job.iteration == training.train_iters:
                logger.log(record)
            if job.valid_data is not None and (job.iteration % training.eval_interval == 0
                                               or job.iteration == training.train_iters):
                logger.log({"iteration": job.iteration, **_evaluate(job)})
            interval = config.checkpoint.save_interval
            if save and interval and job.iteration % interval == 0:
                _save(job)
                last_saved = job.iteration
            if stop.requested():
                logger.message(f"signal received: saving iteration {job.iteration} and exiting")
                break
        if save and last_saved != job.iteration:
            _save(job)
        logging = config.logging
        for what, path in (("checkpoints", save), ("metrics", logging.metrics_file),
                           ("tensorboard", logging.tensorboard_dir)):
            if path:
                logger.message(f"{what}: {os.path.abspath(path)}")
    finally:
        logger.close()
    return job.iteration


def _train_step(job):
    config = job.config
    start = time.perf_counter()
    for chunk in job.ddp_chunks:
        chunk.zero_grad_buffer()
    job.optimizer.zero_grad()
    batches = _batches(job, job.train_data, job.consumed_samples, shuffle_seed=config.training.seed)
    reports = _run_schedule(job, batches, forward_only=False,
                            step=pipeline.forward_step_func(float(config.gift.beta),
                                                            float(config.gift.smooth_lambda),
                                                            pipeline.causal_attention_mask,
                                                            job.vocab_size))
    _, grad_norm, _ = job.optimizer.step()
    job.scheduler.step(increment=1)
    job.consumed_samples += config.training.global_batch_size
    totals = _reduce_reports(reports, ("loss", "student_entropy", "target_mass",
                                       "student_label_prob"), job.chunks[0].device)
    elapsed = time.perf_counter() - start
    tokens = totals.pop("_tokens")
    return {**totals, "lr": job.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(tokens), "step_time": elapsed, "tokens_per_s": tokens / elapsed}


def _evaluate(job):
    config = job.config
    for chunk in job.chunks:
        chunk.student.eval()
    sums = {"valid_ce": [0.0, 0.0], "valid_accuracy": [0.0, 0.0]}
    with torch.no_grad():
        for k in range(config.training.eval_iters):
            batches = _batches(job, job.valid_data, k * config.training.global_batch_size,
                               shuffle_seed=None)
            reports = _run_schedule(job, batches, forward_only=True,
                                    step=pipeline.forward_step_func(
                                        math.inf, 0.0, pipeline.causal_attention_mask,
                                        job.vocab_size, evaluate=True))
            reduced = _reduce_reports(reports, tuple(sums), job.chunks[0].device, as_sums=True)
            for key, (total, count) in reduced.items():
                sums[key][0] += total
                sums[key][1] += count
    for chunk in job.chunks:
        chunk.student.train()
    return {k: sums[k][0] / max(sums[k][1], 1) for k in ("valid_ce", "valid_accuracy")}


def _batches(job, data, consumed, shuffle_seed):
    training = job.config.training
    indices = micro_batch_indices(
        len(data), consumed, training.global_batch_size, training.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
        seed=shuffle_seed)
    return [data.batch(i) for i in indices]


def _run_schedule(job, batches, forward_only, step):
    config = job.config
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    with_reference = job.chunks[0].reference is not None
    adjust = None
    if with_reference and vpp is None and config.parallel.pipeline_model_parallel_size > 1:
        adjust = pipeline.shapes_with_reference(config.model.hidden_size)
    data_iterator = [iter(batches) for _ in job.chunks] if vpp else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data_iterator, model=job.chunks,
        num_microbatches=len(batches), seq_length=config.model.seq_length,
        micro_batch_size=config.training.micro_batch_size, forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust)


def _reduce_reports(reports, keys, device, as_sums=False):
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


def _save(job):
    config = job.config
    run = {"config": OmegaConf.to_container(config), "layout": checkpoint.layout(),
           "architecture": checkpoint.architecture(
               config.model, models.unwrap(job.ddp_chunks[0]).vocab_size),
           "reference_source": job.reference_source}
    checkpoint.save_checkpoint(config.checkpoint.save, job.iteration, job.ddp_chunks,
                               job.optimizer, job.scheduler, job.consumed_samples, run)
    if dist.get_rank() == 0:
        sources.copy_assets(sources.model_source(config), config.checkpoint.save)


class _StopOnSignal:
    """SIGTERM (SLURM pre-emption) asks for a save and a clean exit; all ranks agree."""

    def __init__(self, device):
        self.received, self.device = False, device
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def requested(self):
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _check_before_start(config):
    if config.parallel.use_distributed_optimizer and not torch.cuda.is_available():
        raise ValueError("parallel.use_distributed_optimizer needs CUDA: Megatron-Core's "
                         "DistributedOptimizer accepts only CUDA parameters")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline parallel "
                         f"size = {tp} x {pp}")


def _init_distributed():
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        torch.accelerator.set_device_index(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        from megatron_gift.cpu import enable_cpu_megatron

        enable_cpu_megatron()
        dist.init_process_group(backend="gloo")


def _local_device():
    """This rank's accelerator (chosen by _init_distributed), or the CPU."""
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        return torch.device(accelerator.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    from megatron_gift.synthetic import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(path or TOKENIZER_DIR)


def _dataset(config, path, tokenizer):
    if path is None:
        raise ValueError("data.train_path (--train-path) is required")
    data = config.data
    if data.pack:
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            pass
        else:
            raise ValueError("data.pack needs the local attention layers: the Transformer Engine "
                             "layers that are used when it is installed ignore the packed "
                             "(block-diagonal) attention mask; run without data.pack")
    return SFTDataset(path, tokenizer, config.model.seq_length, prompt_field=data.prompt_field,
                      response_field=data.response_field, messages_field=data.messages_field,
                      text_field=data.text_field, split=data.split, overlong=data.overlong,
                      malformed=data.malformed, pack=data.pack, cache_dir=data.cache_dir)


def _data_report(name, data, seq_length):
    """Log lines on what was read into ``data`` (an SFTDataset) for the ``name`` split."""
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


def _optimizer_config(config, params_dtype):
    opt = config.optimizer
    clip = opt.clip_grad
    return OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=clip,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer)


def _scheduler(config, optimizer):
    opt, iters = config.optimizer, config.training.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.lr_warmup_iters else opt.lr, max_lr=opt.lr,
        min_lr=opt.min_lr, lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(iters, opt.lr_warmup_iters + 1), lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant")


def _describe(job):
    config, p = job.config, job.config.parallel
    mode = "SFT (beta=inf, no reference)" if is_sft(config) else (
        f"GIFT beta={config.gift.beta} lambda={config.gift.smooth_lambda}, reference "
        f"{job.reference_source}")
    return (f"{mode}; TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}"
            f"{f' VPP={p.virtual_pipeline_model_parallel_size}' if p.virtual_pipeline_model_parallel_size else ''}"
            f" DP={parallel_state.get_data_parallel_world_size()}; {len(job.train_data)} sequences,"
            f" {job.micro_batches} micro-batches of {config.training.micro_batch_size} per step;"
            f" starting at iteration {job.iteration}")
