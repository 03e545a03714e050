"""A plan (:class:`megatron_gift.planning.memory.Plan`) as the table ``megatron-gift plan``
prints: GiB per GPU of each part on each pipeline stage, worst first, then the verdict, the
cheapest layout that fits where the run does not, and the time a stopping run needs."""

from megatron_gift.planning.memory import (GIB, USABLE_FRACTION, Plan, Run, active_parameters,
                                           checkpoint_bytes, fused_head_chunk_tokens,
                                           shutdown_timeout, stop_seconds, trained_parameters)

_ROWS = (("student weights", "student_weights"), ("gradients", "gradients"),
         ("optimizer", "optimizer"), ("reference weights", "reference_weights"),
         ("activations", "activations"), ("pipeline buffers", "pipeline_buffers"),
         ("loss buffers", "loss_buffers"), ("FP8 state", "fp8_state"), ("total", "total"))


def as_text(plan: "Plan") -> str:
    """The plan as a table, GiB per GPU, with the verdict and the stopping line."""
    run, stages = plan.run, plan.stages
    vpp = f" (x{run.virtual_pipeline} virtual)" if run.virtual_pipeline else ""
    recompute = run.recompute_granularity or "none"
    if recompute == "full":
        recompute = f"full, {run.recompute_method} {run.recompute_num_layers}"
    lines = [
        f"layout      TP {run.tensor_parallel} x PP {run.pipeline_parallel}{vpp} x CP "
        f"{run.context_parallel} x DP {run.data_parallel} = {run.num_gpus} GPUs; micro-batch "
        f"{run.micro_batch_size} x {run.micro_batches} = global batch {run.global_batch_size}, "
        f"seq {run.seq_length}",
        *_experts(run),
        f"training    {_precision(run)}, sequence parallel "
        f"{'on' if run.sequence_parallel else 'off'}, recompute {recompute}, "
        f"{'distributed' if run.distributed_optimizer else 'plain'} {run.optimizer}, "
        f"{_objective(run)}",
        *_lora(run),
        f"head        {_head(run)}",
        f"student     {plan.student_parameters / 1e9:.2f} B parameters"
        f"{_active(run)}; {_layers(run)}",
        "",
        f"{'GiB per GPU':<20}" + "".join(f"{'stage ' + str(s.pipeline_rank):>10}" for s in stages),
    ]
    for label, key in _ROWS:
        lines.append(f"{label:<20}" + "".join(f"{s.bytes[key] / GIB:>10.2f}" for s in stages))
    lines.append(f"{'in flight':<20}" + "".join(f"{s.in_flight:>10d}" for s in stages))
    lines.append(f"{'parameters per GPU':<20}"
                 + "".join(f"{s.parameters_per_gpu / 1e9:>9.2f}B" for s in stages))
    worst = plan.worst
    budget = (f"{plan.gpu_memory_bytes / GIB:.1f} GiB GPU, {plan.usable_bytes / GIB:.1f} GiB "
              f"usable ({USABLE_FRACTION:.0%})")
    lines.append("")
    if plan.fits:
        lines.append(f"fits: stage {worst.pipeline_rank} needs "
                     f"{worst.bytes['total'] / GIB:.1f} GiB of {budget}")
    else:
        lines.append(f"does not fit: stage {worst.pipeline_rank} needs "
                     f"{worst.bytes['total'] / GIB:.1f} GiB of {budget}")
        lines.append(f"suggestion: {plan.suggestion}")
    step, save = stop_seconds(run)
    lines.append(f"stopping: a step (~{step:.0f} s) and a save of "
                 f"{checkpoint_bytes(run) / GIB:.0f} GiB (~{save:.0f} s), estimated: "
                 f"torchrun --shutdown-timeout {shutdown_timeout(run)}, "
                 f"sbatch --signal=B:TERM@{shutdown_timeout(run)}")
    return "\n".join(lines)


def _experts(run: Run) -> list[str]:
    """The experts' layout line of a MoE model (none for a dense one)."""
    if not run.num_experts:
        return []
    return [f"experts     {run.num_experts} a MoE layer ({sum(run.moe_layers)} of "
            f"{run.num_layers} layers), top {run.moe_topk}: ETP {run.etp} x EP "
            f"{run.expert_parallel} x PP {run.pipeline_parallel} x EDP "
            f"{run.expert_data_parallel}, {run.num_experts // run.expert_parallel} experts a "
            f"GPU; activations for a balanced router"
            + ("" if run.moe_imbalance == 1 else f" x {run.moe_imbalance:g}")]


def _objective(run: Run) -> str:
    """What trains against what: GIFT or SFT, full-parameter or LoRA."""
    if run.lora:
        return ("LoRA GIFT (the reference is the base: adapters off, no weights of its own)"
                if run.reference else "LoRA SFT (no reference)")
    return "GIFT (frozen reference on every stage)" if run.reference else "SFT (no reference)"


def _lora(run: Run) -> list[str]:
    """The adapters' line of a LoRA run (none otherwise)."""
    if not run.lora:
        return []
    dropout = f", dropout {run.lora_dropout:g}" if run.lora_dropout else ""
    return [f"lora        rank {run.lora_rank} on {', '.join(run.lora_targets)}{dropout}: "
            f"{trained_parameters(run) / 1e9:.3f} B trained parameters (gradients and "
            "optimizer state for them alone; the base frozen)"]


def _layers(run: Run) -> str:
    """The layer implementation planned."""
    if run.layer_spec == "local":
        return "Megatron-Core's local layers" + (" (LoRA takes them)" if run.lora else "")
    return "Transformer Engine layers assumed"


def _active(run: Run) -> str:
    """``(3.34 B active)`` for a MoE model: the parameters a token goes through."""
    return f" ({active_parameters(run) / 1e9:.2f} B active)" if run.num_experts else ""


def _head(run: Run) -> str:
    """The loss head planned (``gift.head``) and, for the fused head, its chunk."""
    if run.head != "fused":
        return "logits (each model's [b, s, V/tp] logits held for the loss)"
    default = "" if run.head_chunk_tokens is not None else ", default: a 128 MiB fp32 tile"
    return (f"fused (the logits {fused_head_chunk_tokens(run)} tokens at a time{default}; "
            "never whole)")


def _precision(run) -> str:
    """``bf16``, ``fp32`` or ``bf16 + FP8 tensorwise (FP8 weights), reference FP8``."""
    text = "bf16" if run.param_bytes == 2 else "fp32"
    if not run.fp8:
        return text
    text += f" + FP8 {run.fp8_recipe}" + (" (FP8 weights)" if run.fp8_param else "")
    start, end = run.fp8_bf16_layers
    if start or end:
        text += f", first {start} and last {end} layers bf16"
    if run.reference:
        text += ", reference " + ("FP8" if run.reference_fp8 else "bf16") + (
            " (FP8 weights)" if run.reference_fp8_weights else "")
    return text
