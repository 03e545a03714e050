"""Bytes per GPU of a GIFT run, pipeline stage by pipeline stage, from the run config alone.

Nothing is built and no file is read: the ``model`` section must carry the architecture
(``num_layers``, ``hidden_size``, heads, groups, ``ffn_hidden_size``, ``vocab_size``, ...).
Every count follows what Megatron-Core 0.19 allocates for this project's models
(:mod:`megatron_gift.core.model`) and what autograd keeps for the backward:

* **student weights**: the parameters of this stage's chunks on one GPU (TP-sharded linear
  layers and vocab, replicated norms (Qwen3's per-head query and key norms too), QKV with GQA
  and optional bias, SwiGLU ``fc1`` of ``2 * ffn`` rows or, in a mixture-of-experts layer, the
  router ``[E, h]`` and ``E / EP`` experts split over the experts' TP, the vocab padded as
  :func:`padded_vocab_size`, untied or tied embeddings: a tied output layer is a second copy on
  the last stage when PP > 1) in the parameter dtype;
* **gradients**: Megatron's DDP grad buffers (the experts' of their own), fp32 with
  ``grad_reduce_in_fp32`` (or fp32 parameters), else bf16 plus the fp32 copies the optimizer
  makes of its shard at the step;
* **optimizer**: fp32 main weights (bf16 runs) and the Adam moments (SGD: its momentum),
  sharded by the distributed optimizer over data x context parallel ranks (Megatron-LM's
  ``6 + 12 / DP`` bytes per parameter with the grad buffer above), the experts' over the ranks
  holding the same experts (``TP x CP x DP / (ETP x EP)``: :attr:`Run.expert_data_parallel`);
* **reference weights**: the frozen reference's shard in the parameter dtype: no gradient, no
  optimizer state, no saved activations (it runs under ``no_grad``); none for plain SFT;
* **activations**: what the student's autograd graph keeps for each micro-batch in flight
  (1F1B: ``min(PP - rank, M)``; interleaved: Megatron's warm-up count + 1 chunk-forwards), with
  sequence parallelism, recompute (selective: core attention; full: layer-group inputs; plus
  what the backward's recompute re-creates beyond what it has freed by then) and context
  parallelism (the sequence split evenly); a MoE layer's router, token dispatcher and local
  experts for a perfectly balanced router, or :attr:`Run.moe_imbalance` times its share
  (:func:`moe_activations`);
* **pipeline buffers**: per micro-batch in flight, the received hidden states ``[s / sp, b, h]``
  plus the reference's half ``[.., h]`` that travels with them (the sent ones are freed once
  sent: ``deallocate_pipeline_outputs``), and the two gradient buffers of the backward;
* **loss buffers** (last stage, one micro-batch), by the head the run asks for
  (``gift.head``): ``logits``, the student and reference logit shards ``[b, s, V/tp]``, the
  fp32 ``softmax - g p'`` buffer the GIFT loss keeps for the backward and its two fp32
  row-chunk workspaces (:mod:`megatron_gift.loss.eager`); ``fused``, the fused head's chunk
  tiles, its fp32 gradient accumulators and per-token coefficients, the reference's hidden
  states it keeps and the gradients it returns, never the logits
  (:mod:`megatron_gift.loss.fused_head`, :func:`fused_head_terms`);
* **FP8 state** (``precision`` section): what Transformer Engine keeps beside the weights of
  the layers that run FP8: FP8 copies of the GEMM weights and their transposes, and the
  scaling state (:func:`fp8_state_bytes`). FP8 also changes the weights (``--fp8-param-gather``,
  ``--reference-fp8-weights``: the GEMM weights themselves are FP8) and the activations (the
  GEMM inputs TE saves are FP8): :func:`layer_activations`, :func:`plan_stage`;
* **LoRA** (``lora.rank``; :mod:`megatron_gift.planning.lora`): the student's weights are the
  frozen base's and the adapters'; gradients and optimizer state the adapters' alone
  (:func:`stage_trained_parameters`); no reference weights (the reference is the base with the
  adapters off: :func:`reference_weight_bytes`); Megatron-Core's local layers on any device,
  whose frozen linears keep no input while each adapter keeps its own
  (:func:`lora_layer_activations`), and whose attention keeps and works on ``[b, a/tp, s, s]``
  scores (:func:`local_attention_workspace`). The reference's pass keeps nothing (``no_grad``)
  and its transient peak stays below the student's: it runs just before the student's pass of
  the same micro-batch through the same modules (one layer's temporaries at a time, the very
  ones the student's pass makes at that layer), when the student's pass at the same layer holds
  besides what every layer before it keeps; its output is counted where it waits (the pipeline
  buffers' reference half, the loss buffers' reference logits or hidden states).

Two layer implementations are modelled: ``"te"``, Transformer Engine's layers that GPU runs use
(fused norm + linear, flash attention that keeps no ``s x s`` scores; derived from the source, not
measured here) and ``"local"``, Megatron-Core's own layers that CPU runs and LoRA runs use (measured
on a CPU: ``tests/test_plan.py``; on CUDA torch's fused RMSNorm keeps the input in its own dtype
instead of an fp32 copy, so the CPU's count is an upper bound there). FP8 exists only with ``"te"``;
the GPU is taken to be a Hopper (H100, H200), where an FP8 GEMM needs its operands' transposes. A
MoE layer's token dispatcher is the one the engine picks: all-to-all on CUDA (read from the source),
all-gather on a CPU (measured). Not modelled: the CUDA context, NCCL's buffers and the allocator's
fragmentation (:data:`USABLE_FRACTION` leaves room for them), the reference's no-grad forward
temporaries (one layer's at a time, below what the student's pass holds then: see LoRA above), the
MoE dispatcher's transient token buffers, and the distributed optimizer's bucket padding.
"""

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from megatron_gift.config.checks import (layer_split_problems, lora_targets, moe_layer_freq,
                                          raise_problems)
from megatron_gift.core.vocab import padded_vocab_size
from megatron_gift.errors import ConfigError, UserError
from megatron_gift.planning import lora

if TYPE_CHECKING:
    from omegaconf import DictConfig

GIB = 1 << 30
PARTS = ("student_weights", "gradients", "optimizer", "reference_weights", "activations",
         "pipeline_buffers", "loss_buffers", "fp8_state")
# A plan fits when its total is at most this share of the GPU's memory: the rest is for the
# CUDA context, NCCL's buffers and the caching allocator's fragmentation.
USABLE_FRACTION = 0.9
# Elements of one fp32 row-chunk workspace of the GIFT loss (megatron_gift.loss.eager._Workspace).
LOSS_WORKSPACE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}
# Bytes of one fp32 [chunk, V/tp] tile of the fused head when gift.head_chunk_tokens is not set
# (megatron_gift.loss.fused_head.TILE_BYTES).
FUSED_HEAD_TILE_BYTES = 128 << 20
LAYER_SPECS = ("te", "local")
_FP32 = 4
# Transformer Engine 2.x's FP8 (transformer_engine/pytorch): bytes per element of one FP8 copy of
# a weight (rowwise data, or its transpose / columnwise copy) and of a saved GEMM input, scales
# included: delayed and tensorwise scaling keep one fp32 scale per tensor (tensor/float8_tensor.py;
# 4 bytes a tensor, left out); blockwise an fp32 scale per 128 x 128 weight block and per 1 x 128
# activation block (tensor/float8_blockwise_tensor.py); MXFP8 an 8-bit scale per 32 elements
# (tensor/mxfp8_tensor.py).
_FP8_WEIGHT_BYTES = {"delayed": 1.0, "tensorwise": 1.0, "blockwise": 1 + _FP32 / 128 ** 2,
                     "mxfp8": 1 + 1 / 32}
_FP8_ACTIVATION_BYTES = {"delayed": 1.0, "tensorwise": 1.0, "blockwise": 1 + _FP32 / 128,
                         "mxfp8": 1 + 1 / 32}
# TE GEMM modules of a layer: linear_qkv and linear_fc1 (LayerNormLinear), linear_proj and
# linear_fc2 (Linear); each has 5 quantizer slots: input, weight and output forward, grad output
# and grad input backward (module/base.py: TransformerEngineBaseModule.init_fp8_meta_tensors).
_GEMMS_PER_LAYER = 4
_FP8_SLOTS_PER_GEMM = 5


@dataclass(frozen=True)
class Run:
    """What the memory of a run depends on. Model sizes are whole-model sizes (not per GPU);
    bytes are per element."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int  # the real vocab
    vocab_multiple: int  # model.make_vocab_size_divisible_by
    untied: bool
    qkv_bias: bool
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: Optional[int]
    context_parallel: int
    data_parallel: int
    sequence_parallel: bool
    distributed_optimizer: bool
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    param_bytes: int  # 2 (bf16) or 4 (fp32); activations and pipeline tensors alike
    grad_reduce_in_fp32: bool
    optimizer: str  # adam | sgd
    sgd_momentum: float
    recompute_granularity: Optional[str]  # None | selective | full
    recompute_method: Optional[str]  # uniform | block (full only)
    recompute_num_layers: Optional[int]
    reference: bool  # a frozen reference exists (finite beta)
    packed: bool  # data.pack: one [s, s] attention mask per sample instead of per micro-batch
    layer_spec: str = "te"
    device: str = "cuda"
    # SwiGLU as Megatron-Core's fused autograd function (bias_activation_fusion, on with CUDA:
    # megatron_gift.core.model.transformer_config).
    fused_swiglu: bool = True
    # The precision section. FP8 recipe of the student's layers (None: no FP8); with it:
    fp8_recipe: Optional[str] = None
    fp8_param: bool = False  # --fp8-param-gather: the student's GEMM weights are FP8
    fp8_amax_history_len: int = 1  # delayed scaling
    fp8_bf16_layers: tuple[int, int] = (0, 0)  # bf16 layers at the start and at the end
    reference_fp8: bool = False  # --reference-precision fp8
    reference_fp8_weights: bool = False  # the reference's GEMM weights are FP8
    # The gift section's head: "logits" (materialised, then the loss) or "fused" (chunk by
    # chunk from the hidden states); the fused head's tokens per chunk (None: its default,
    # fused_head_chunk_tokens); smoothing on (smooth_lambda > 0: one more per-token coefficient).
    head: str = "logits"
    head_chunk_tokens: Optional[int] = None
    smooth: bool = False
    # Qwen3: an RMSNorm on each head's query and key (Megatron-Core's qk_layernorm).
    qk_layernorm: bool = False
    # Mixture of experts (Qwen3-MoE: Megatron-Core's MoELayer, SequentialMLP experts, a softmax
    # top-k router): experts per MoE layer (0: a dense model), the top k, each expert's SwiGLU
    # width, which layers are MoE (one flag a layer; empty: none), EP and the experts' TP (None:
    # TP); the softmax over all experts before the top-k (not norm_topk_prob); the student's
    # load-balancing loss (None, aux_loss or seq_aux_loss).
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None
    moe_pre_softmax: bool = False
    moe_aux_loss: Optional[str] = None
    # How many times its balanced share of token copies the busiest GPU's experts take (1.0: a
    # perfectly balanced router; at most min(topk, E / EP) x EP / topk: every token to them).
    moe_imbalance: float = 1.0
    # LoRA (the lora section): the adapters' rank (None: full-parameter training), the linears
    # that take them (in megatron_gift.planning.lora.TARGET_ORDER) and the dropout on their
    # input. The base is frozen, the reference is the base itself (no weights of its own) and
    # the layers are Megatron-Core's local ones (layer_spec "local").
    lora_rank: Optional[int] = None
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0

    @property
    def num_gpus(self) -> int:
        """TP x PP x CP x DP."""
        return (self.tensor_parallel * self.pipeline_parallel * self.context_parallel
                * self.data_parallel)

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline stage (VPP, else 1)."""
        return self.virtual_pipeline or 1

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)

    @property
    def fp8(self) -> bool:
        """Whether layers run FP8 (Transformer Engine's layers only)."""
        return self.fp8_recipe is not None and self.layer_spec == "te"

    @property
    def etp(self) -> int:
        """The experts' tensor parallel size (``expert_tensor_parallel_size``, default TP)."""
        return self.expert_tensor_parallel or self.tensor_parallel

    @property
    def expert_data_parallel(self) -> int:
        """Ranks holding the same experts: Megatron-Core lays the experts out as ETP x EP x PP x
        EDP over the same ``TP x PP x CP x DP`` GPUs, so EDP = TP x CP x DP / (ETP x EP)."""
        return (self.tensor_parallel * self.context_parallel * self.data_parallel
                // (self.etp * self.expert_parallel))

    @property
    def lora(self) -> bool:
        """Whether the run trains LoRA adapters on a frozen base."""
        return self.lora_rank is not None

    @property
    def padded_vocab(self) -> int:
        """The vocab rows the embedding and output layer hold (all TP ranks together)."""
        return padded_vocab_size(self.vocab_size, self.vocab_multiple, self.tensor_parallel)


@dataclass
class StagePlan:
    """One pipeline stage: parameters on one of its GPUs and bytes per GPU by part."""

    pipeline_rank: int
    parameters_per_gpu: int
    bytes: dict[str, int]  # PARTS and "total"
    in_flight: int  # micro-batches (chunk-forwards with VPP) whose activations it holds


@dataclass
class Plan:
    """Every stage of a run (worst first), whether the worst fits, and what would make it."""

    run: Run
    student_parameters: int
    stages: list[StagePlan]
    gpu_memory_bytes: int
    fits: bool
    suggestion: Optional[str] = None
    suggested_run: Optional[Run] = field(default=None, repr=False)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * USABLE_FRACTION)

    @property
    def worst(self) -> StagePlan:
        return self.stages[0]

    def as_dict(self) -> dict[str, Any]:
        """The plan as the JSON object of ``python -m megatron_gift.plan --json``; ``head``
        names the loss head planned, its chunk (fused) and the last stage's loss buffers by
        term (:func:`loss_terms`), in bytes; ``layout`` holds the experts' EP (1 for a dense
        model) and TP (null for a dense model); ``student_active``: the parameters a token
        goes through (:func:`active_parameters`); ``student_trained``: those that train
        (:func:`trained_parameters`); ``lora``: the adapters of a LoRA run (null without)."""
        run = self.run
        step, save = stop_seconds(run)
        return {
            "layout": {"tensor_model_parallel_size": run.tensor_parallel,
                       "pipeline_model_parallel_size": run.pipeline_parallel,
                       "virtual_pipeline_model_parallel_size": run.virtual_pipeline,
                       "context_parallel_size": run.context_parallel,
                       "data_parallel_size": run.data_parallel,
                       "micro_batch_size": run.micro_batch_size,
                       "global_batch_size": run.global_batch_size,
                       "seq_length": run.seq_length, "num_gpus": run.num_gpus,
                       "expert_model_parallel_size": run.expert_parallel,
                       "expert_tensor_parallel_size": run.etp if run.num_experts else None},
            "parameters": {"student_total": self.student_parameters,
                           "student_active": active_parameters(run),
                           "student_trained": trained_parameters(run)},
            "lora": ({"rank": run.lora_rank, "target_modules": list(run.lora_targets),
                      "dropout": run.lora_dropout, "trained_parameters": trained_parameters(run)}
                     if run.lora else None),
            "stages": [{"pipeline_rank": s.pipeline_rank,
                        "parameters_per_gpu": s.parameters_per_gpu, "bytes": dict(s.bytes)}
                       for s in self.stages],
            "head": {"name": run.head,
                     "chunk_tokens": fused_head_chunk_tokens(run) if run.head == "fused" else None,
                     "loss_buffers": loss_terms(run)},
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "usable_memory_bytes": self.usable_bytes,
            "fits": self.fits, "suggestion": self.suggestion,
            "stop": {"step_seconds": step, "save_bytes": checkpoint_bytes(run),
                     "save_seconds": save, "shutdown_timeout": shutdown_timeout(run)}}


# ----------------------------------------------------------------------------------------------
# The run from its config


def run_from_config(config: "DictConfig", num_gpus: Optional[int] = None,
                    layer_spec: str = "te", device: str = "cuda") -> Run:
    """The :class:`Run` of a validated run config on ``num_gpus`` GPUs (default TP x PP x CP,
    i.e. one data-parallel rank). Raises one ConfigError/UserError naming every key or flag at
    fault when the config lacks the architecture or the layout does not divide. A LoRA run
    (``lora.rank``) takes the local layers whatever ``layer_spec`` says, as the engine builds
    them (:func:`megatron_gift.core.model.build_chunks`)."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer_spec must be one of {LAYER_SPECS}, got {layer_spec!r}")
    layer_spec = "local" if config.lora.rank is not None else layer_spec
    model, parallel, training = config.model, config.parallel, config.training
    problems = [] if model.vocab_size is not None else [
        "model.vocab_size (--vocab-size) is not set: the planner reads no model files, so the "
        "model section must carry the architecture (vocab_size from the model's config.json)"]
    problems += layer_split_problems(config)
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    model_parallel = tp * pp * cp
    num_gpus = model_parallel if num_gpus is None else num_gpus
    gpus_divide = num_gpus > 0 and num_gpus % model_parallel == 0
    if not gpus_divide:
        problems.append(f"--num-gpus {num_gpus} is not a positive multiple of tensor x pipeline x "
                        f"context parallel size = {tp} x {pp} x {cp}")
    dp = num_gpus // model_parallel
    if gpus_divide and training.global_batch_size % (training.micro_batch_size * dp):
        problems.append(
            f"training.global_batch_size={training.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {training.micro_batch_size} x {dp} "
            "(--global-batch-size, --micro-batch-size, --num-gpus)")
    problems += _expert_layout_problems(config, num_gpus) if gpus_divide else []
    raise_problems(problems, ConfigError if gpus_divide else UserError)
    return Run(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size, vocab_size=model.vocab_size,
        vocab_multiple=model.make_vocab_size_divisible_by,
        untied=model.untie_embeddings_and_output_weights, qkv_bias=model.add_qkv_bias,
        tensor_parallel=tp, pipeline_parallel=pp,
        virtual_pipeline=parallel.virtual_pipeline_model_parallel_size, context_parallel=cp,
        data_parallel=dp, sequence_parallel=parallel.sequence_parallel,
        distributed_optimizer=parallel.use_distributed_optimizer,
        micro_batch_size=training.micro_batch_size,
        global_batch_size=training.global_batch_size, seq_length=model.seq_length,
        param_bytes=2 if training.bf16 else 4, grad_reduce_in_fp32=parallel.grad_reduce_in_fp32,
        optimizer=config.optimizer.optimizer, sgd_momentum=config.optimizer.sgd_momentum,
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method,
        recompute_num_layers=training.recompute_num_layers,
        reference=not math.isinf(config.gift.beta), packed=config.data.pack,
        layer_spec=layer_spec, device=device, fused_swiglu=device == "cuda",
        head=config.gift.head, head_chunk_tokens=config.gift.head_chunk_tokens,
        smooth=config.gift.smooth_lambda > 0, qk_layernorm=model.qk_layernorm,
        **_precision(config), **_experts(config), **_lora(config))


def _expert_layout_problems(config: "DictConfig", num_gpus: int) -> list[str]:
    """EP x the experts' TP must divide TP x CP x DP, as Megatron-Core lays the experts out
    inside data parallelism (``world % (ETP x EP x PP)``); the world of ``num_gpus``."""
    parallel = config.parallel
    ep, pp = parallel.expert_model_parallel_size, parallel.pipeline_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size
    if not config.model.num_moe_experts or num_gpus % (etp * ep * pp) == 0:
        return []
    return [f"--num-gpus {num_gpus} is not a multiple of expert tensor x expert x pipeline "
            f"parallel size = {etp} x {ep} x {pp} (Megatron-Core lays the experts out inside "
            "data parallelism; --expert-model-parallel-size, --expert-tensor-parallel-size)"]


def _experts(config: "DictConfig") -> dict[str, Any]:
    """The :class:`Run` fields of a mixture-of-experts model (none for a dense one)."""
    model, training = config.model, config.training
    if not model.num_moe_experts:
        return {}
    balancing = training.moe_router_load_balancing_type
    aux = balancing if training.moe_aux_loss_coeff > 0 and balancing != "none" else None
    return {"num_experts": model.num_moe_experts, "moe_topk": model.moe_router_topk,
            "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
            "moe_layers": _moe_pattern(model),
            "expert_parallel": config.parallel.expert_model_parallel_size,
            "expert_tensor_parallel": config.parallel.expert_tensor_parallel_size,
            "moe_pre_softmax": not model.moe_norm_topk_prob, "moe_aux_loss": aux}


def _moe_pattern(model: "DictConfig") -> tuple[bool, ...]:
    """Per layer, whether it is a MoE layer: ``moe_layer_freq`` every k-th layer (0-based
    multiples of k) or one 0/1 a layer, as Megatron-Core's ``moe_layer_freq`` (and
    ``megatron_gift.hf.architecture.moe_layers``) reads it."""
    pattern = moe_layer_freq(model.moe_layer_freq)
    if isinstance(pattern, int):
        return tuple(i % pattern == 0 for i in range(model.num_layers))
    return tuple(bool(v) for v in pattern)


def _lora(config: "DictConfig") -> dict[str, Any]:
    """The :class:`Run` fields of the ``lora`` section (none for full-parameter training)."""
    if config.lora.rank is None:
        return {}
    return {"lora_rank": config.lora.rank, "lora_targets": lora_targets(config),
            "lora_dropout": float(config.lora.dropout)}


def _precision(config: "DictConfig") -> dict[str, Any]:
    """The :class:`Run` fields of the ``precision`` section (none without FP8)."""
    precision = config.precision
    if precision.fp8_format is None:
        return {}
    reference_fp8 = precision.reference_precision == "fp8" and not math.isinf(config.gift.beta)
    edges = (precision.num_layers_at_start_in_bf16, precision.num_layers_at_end_in_bf16)
    return {"fp8_recipe": precision.fp8_recipe, "fp8_param": precision.fp8_param_gather,
            "fp8_amax_history_len": precision.fp8_amax_history_len,
            "fp8_bf16_layers": edges if precision.first_last_layers_bf16 else (0, 0),
            "reference_fp8": reference_fp8,
            "reference_fp8_weights": reference_fp8 and precision.reference_fp8_weights}


# ----------------------------------------------------------------------------------------------
# Parameters


def is_moe_layer(run: Run, layer: int) -> bool:
    """Whether the layer of global index ``layer`` (0-based) is a mixture-of-experts layer
    (``model.moe_layer_freq``: :func:`_moe_pattern`)."""
    return bool(run.moe_layers) and run.moe_layers[layer]


def _attention_parameters(run: Run) -> int:
    """Attention weights of one layer, all TP ranks together: QKV ``(a + 2g) d x h`` (+ bias)
    and the output projection ``h x a d``."""
    h, d = run.hidden_size, run.kv_channels
    qkv_rows = (run.num_attention_heads + 2 * run.num_query_groups) * d
    return qkv_rows * h + (qkv_rows if run.qkv_bias else 0) + h * run.num_attention_heads * d


def layer_expert_parameters(run: Run) -> int:
    """The experts' weights of one MoE layer on one GPU: ``E / EP`` local experts
    (Megatron-Core's ``SequentialMLP``), each a SwiGLU ``fc1`` ``2 moe_ffn x h`` and ``fc2``
    ``h x moe_ffn`` split over the experts' TP."""
    local = run.num_experts // run.expert_parallel
    return local * 3 * run.moe_ffn_hidden_size * run.hidden_size // run.etp


def layer_parameters(run: Run, moe: bool = False) -> int:
    """Parameters of one transformer layer on one GPU: two RMSNorm weights ``h`` and, with
    ``qk_layernorm``, the query and key norms ``d`` each (all replicated), the attention
    (:func:`_attention_parameters`) split over TP; then SwiGLU ``fc1`` ``2 ffn x h`` and
    ``fc2`` ``h x ffn`` split over TP, or for a MoE layer (``moe``) the router ``[E, h]``
    (replicated: ``TopKRouter.weight``) and the local experts (:func:`layer_expert_parameters`);
    with LoRA, the adapters (:func:`megatron_gift.planning.lora.layer_adapter_parameters`)."""
    h, t = run.hidden_size, run.tensor_parallel
    replicated = 2 * h + (2 * run.kv_channels if run.qk_layernorm else 0)
    if moe:
        return (replicated + run.num_experts * h + _attention_parameters(run) // t
                + layer_expert_parameters(run))
    return (replicated + (_attention_parameters(run) + 3 * run.ffn_hidden_size * h) // t
            + lora.layer_adapter_parameters(run))


def chunk_parameters(run: Run, layers: range, pre_process: bool, post_process: bool) -> int:
    """Parameters on one GPU of a model chunk of the layers of global indices ``layers``; the
    first chunk holds the word embedding ``V_pad/tp x h``, the last the final norm ``h`` and the
    output layer (tied: a copy unless the chunk also holds the embedding)."""
    h = run.hidden_size
    vocab_rows = run.padded_vocab // run.tensor_parallel
    count = sum(layer_parameters(run, is_moe_layer(run, i)) for i in layers)
    if pre_process:
        count += vocab_rows * h
    if post_process:
        count += h
        if run.untied or not pre_process:
            count += vocab_rows * h
    return count


def _stage_chunks(run: Run, rank: int) -> list[int]:
    """Virtual stages (model chunks) of pipeline stage ``rank``: ``k x PP + rank``."""
    return [k * run.pipeline_parallel + rank for k in range(run.chunks)]


def stage_parameters(run: Run, rank: int) -> int:
    """Student parameters on one GPU of pipeline stage ``rank`` (all its virtual chunks)."""
    stages = run.pipeline_parallel * run.chunks
    return sum(chunk_parameters(run, chunk_layers(run, v), pre_process=v == 0,
                                post_process=v == stages - 1)
               for v in _stage_chunks(run, rank))


def stage_trained_parameters(run: Run, rank: int) -> int:
    """The parameters of :func:`stage_parameters` that train (take a gradient buffer and
    optimizer state): all of them, or with LoRA the adapters alone (the base is frozen:
    ``megatron_gift.core.lora.freeze_base``)."""
    if not run.lora:
        return stage_parameters(run, rank)
    return lora.layer_adapter_parameters(run) * len(_stage_layers(run, rank))


def stage_expert_parameters(run: Run, rank: int) -> int:
    """The experts' share of :func:`stage_parameters` (data-parallel over the expert
    data-parallel group, :attr:`Run.expert_data_parallel`)."""
    return layer_expert_parameters(run) * sum(
        is_moe_layer(run, i) for v in _stage_chunks(run, rank) for i in chunk_layers(run, v))


def layer_gemm_parameters(run: Run, moe: bool = False) -> int:
    """Weights on one GPU of one layer's GEMMs, the ones FP8 quantizes (the norms, the router
    and the QKV bias stay in the parameter dtype): QKV, the output projection and fc1, fc2 or,
    for a MoE layer, the local experts' fc1 and fc2."""
    h, d = run.hidden_size, run.kv_channels
    qkv_rows = (run.num_attention_heads + 2 * run.num_query_groups) * d
    attention = (qkv_rows * h + h * run.num_attention_heads * d) // run.tensor_parallel
    if moe:
        return attention + layer_expert_parameters(run)
    return attention + 3 * run.ffn_hidden_size * h // run.tensor_parallel


def layer_gemm_modules(run: Run, moe: bool = False) -> int:
    """Transformer Engine GEMM modules of one layer on one GPU: linear_qkv, linear_proj and
    linear_fc1, linear_fc2 (:data:`_GEMMS_PER_LAYER`), or a MoE layer's two per local expert."""
    if not moe:
        return _GEMMS_PER_LAYER
    return 2 + 2 * (run.num_experts // run.expert_parallel)


def is_fp8_layer(run: Run, layer: int) -> bool:
    """Whether the layer of global index ``layer`` (0-based) runs FP8: every layer of an FP8
    run but the bf16 ones at its start and end (Megatron-Core's
    ``fp8_utils.is_first_last_bf16_layer``)."""
    start, end = run.fp8_bf16_layers
    return run.fp8 and start <= layer < run.num_layers - end


def chunk_layers(run: Run, virtual_stage: int) -> range:
    """Global indices of the layers of model chunk ``virtual_stage`` (``k x PP + rank`` for the
    k-th chunk of stage ``rank``)."""
    per_chunk = run.num_layers // (run.pipeline_parallel * run.chunks)
    return range(virtual_stage * per_chunk, (virtual_stage + 1) * per_chunk)


def _stage_layers(run: Run, rank: int) -> list[int]:
    """Global indices of the layers of stage ``rank``, all its chunks."""
    return [i for v in _stage_chunks(run, rank) for i in chunk_layers(run, v)]


def stage_fp8_layers(run: Run, rank: int) -> int:
    """Layers of stage ``rank`` (all its chunks) that run FP8."""
    return sum(is_fp8_layer(run, i) for i in _stage_layers(run, rank))


def stage_fp8_gemms(run: Run, rank: int) -> tuple[int, int]:
    """``(weights, modules)``: the GEMM weights (:func:`layer_gemm_parameters`) and GEMM
    modules (:func:`layer_gemm_modules`) of the FP8 layers of stage ``rank`` on one GPU."""
    fp8 = [i for i in _stage_layers(run, rank) if is_fp8_layer(run, i)]
    return (sum(layer_gemm_parameters(run, is_moe_layer(run, i)) for i in fp8),
            sum(layer_gemm_modules(run, is_moe_layer(run, i)) for i in fp8))


def total_parameters(run: Run) -> int:
    """Student parameters of the whole model (TP and EP shards together, a tied embedding
    once)."""
    whole = replace(run, tensor_parallel=1, expert_parallel=1, expert_tensor_parallel=1)
    embedding = run.padded_vocab * run.hidden_size
    layers = sum(layer_parameters(whole, is_moe_layer(run, i)) for i in range(run.num_layers))
    return layers + run.hidden_size + embedding * (2 if run.untied else 1)


def trained_parameters(run: Run) -> int:
    """Student parameters that train, whole model (TP shards together): all of them, or with
    LoRA the adapters (``A`` and ``B`` whole)."""
    if not run.lora:
        return total_parameters(run)
    return lora.layer_adapter_parameters(replace(run, tensor_parallel=1)) * run.num_layers


def active_parameters(run: Run) -> int:
    """Student parameters a token goes through: :func:`total_parameters` less, in every MoE
    layer, the experts it is not routed to (``E - topk`` of them)."""
    idle = (run.num_experts - run.moe_topk) * 3 * run.moe_ffn_hidden_size * run.hidden_size
    return total_parameters(run) - idle * sum(run.moe_layers)


# ----------------------------------------------------------------------------------------------
# Weights, gradients, optimizer


def optimizer_shard(run: Run, experts: bool = False) -> int:
    """Ranks the distributed optimizer shards its state over: data x context parallel, or for
    the experts' parameters the expert data-parallel group (with EP > 1 or an expert TP of their
    own, Megatron-Core's DDP puts them in buffers of their own over ``intra_expt_dp_group``;
    else they share the others', over as many ranks); 1 without the distributed optimizer."""
    if not run.distributed_optimizer:
        return 1
    return run.expert_data_parallel if experts else run.data_parallel * run.context_parallel


def _sharded(run: Run, parameters: int, expert_parameters: int, per_parameter: int) -> int:
    """``per_parameter`` bytes of each of ``parameters`` (of which ``expert_parameters`` are
    the experts'), each group divided over its distributed optimizer's shard."""
    dense = parameters - expert_parameters
    return (dense * per_parameter // optimizer_shard(run)
            + expert_parameters * per_parameter // optimizer_shard(run, experts=True))


def gradient_bytes(run: Run, parameters: int, expert_parameters: int = 0) -> int:
    """The DDP grad buffers of ``parameters`` (``expert_parameters`` of them the experts',
    whichever buffer holds them) in fp32 with grad_reduce_in_fp32 or fp32 parameters,
    else in the parameter dtype plus the fp32 copies of the optimizer's shard made at the step
    (``main_grad.float()``)."""
    fp32_buffer = run.grad_reduce_in_fp32 or run.param_bytes == _FP32
    buffer = parameters * (_FP32 if fp32_buffer else run.param_bytes)
    copies = 0 if fp32_buffer else _sharded(run, parameters, expert_parameters, _FP32)
    return buffer + copies


def optimizer_bytes(run: Run, parameters: int, expert_parameters: int = 0) -> int:
    """fp32 main weights (bf16 runs only) and the optimizer's moments (Adam: 2, SGD with
    momentum: 1, fp32) of ``parameters`` (``expert_parameters`` of them the experts'), divided
    over the distributed optimizer's shards (:func:`optimizer_shard`)."""
    main = _FP32 if run.param_bytes != _FP32 else 0
    moments = 2 if run.optimizer == "adam" else (1 if run.sgd_momentum else 0)
    return _sharded(run, parameters, expert_parameters, main + moments * _FP32)


# ----------------------------------------------------------------------------------------------
# Activations


def in_flight(run: Run, rank: int) -> int:
    """Forward passes (chunk-forwards with VPP) whose activations stage ``rank`` holds at its
    peak: Megatron-Core's warm-up count + 1, bounded by the micro-batches of the step."""
    pp, m = run.pipeline_parallel, run.micro_batches
    if pp == 1:
        return 1  # forward then backward, micro-batch after micro-batch
    if run.virtual_pipeline is None:
        return min(pp - rank, m)
    total = m * run.chunks
    warmup = (pp - rank - 1) * 2 + (run.chunks - 1) * pp  # microbatch_group_size_per_vp_stage = PP
    return total if warmup >= total else warmup + 1


def _tokens(run: Run) -> int:
    """Tokens of one micro-batch on one GPU before SP: ``s / cp x b``."""
    return run.seq_length // run.context_parallel * run.micro_batch_size


def _sp(run: Run) -> int:
    return run.tensor_parallel if run.sequence_parallel else 1


def _widths(run: Run) -> tuple[float, float]:
    """Per-GPU widths of the query ``a d / tp`` and of one of key / value ``g d / tp``."""
    d, t = run.kv_channels, run.tensor_parallel
    return run.num_attention_heads * d / t, run.num_query_groups * d / t


def _saved_input_bytes(run: Run, fp8: bool) -> float:
    """Bytes per element of a GEMM input Transformer Engine saves for the backward: the
    activation dtype, or with ``fp8`` the FP8 copy it quantized for the GEMM (TE 2.x
    module/linear.py ``_Linear.forward`` and module/layernorm_linear.py
    ``_LayerNormLinear.forward`` save ``inputmat`` / ``ln_out`` after ``input_quantizer``,
    columnwise-only or, when sequence parallelism gathers it again, rowwise-only: one FP8 copy
    either way)."""
    return _FP8_ACTIVATION_BYTES[run.fp8_recipe] if fp8 and run.fp8 else run.param_bytes


# The terms of :func:`layer_activations` that a layer's backward frees before it reaches the
# core attention: the MLP side, dense, MoE or LoRA's, its norm, and the output projection's.
_FREED_BEFORE_ATTENTION = ("mlp", "router", "dispatch", "experts", "lora_linear_fc1",
                           "lora_linear_fc2", "pre_mlp_norm", "projection", "lora_linear_proj")


def layer_activations(run: Run, recompute: Optional[str] = None,
                      fp8: Optional[bool] = None, moe: bool = False) -> dict[str, float]:
    """Bytes one transformer layer keeps for the backward of one micro-batch, by term.

    ``recompute``: None or ``"selective"`` (core attention recomputed); ``fp8``: the layer runs FP8
    (default: as the run does, away from bf16 edge layers); ``moe``: a mixture-of-experts layer
    (LoRA runs take the terms of :func:`lora_layer_activations` instead). Terms: ``norms`` (both RMSNorms, with the inputs of the
    linear layers they feed), ``qk_norms`` (Qwen3's query and key norms, 0 without), ``rope``,
    ``attention`` (Q, K, V and the core attention's internals), ``projection`` (the output
    projection's input: the core attention's output), then ``mlp`` (SwiGLU: fc1's output and fc2's
    input; unfused also the linear half plus 0 and SiLU's output) or, for a MoE layer, ``router``,
    ``dispatch`` and ``experts`` (:func:`moe_activations`).

    With FP8 (Transformer Engine's layers), the inputs TE's linear layers save are FP8
    (:func:`_saved_input_bytes`): the norms' outputs and fc2's input take 1 byte an element
    instead of 2; the output projection saves an FP8 copy of its input beside the bf16 one
    flash attention keeps (unless selective recompute frees that). Attention itself stays bf16,
    and so does a MoE layer's second norm output, which the router keeps.
    """
    if run.lora:
        return lora_layer_activations(run, recompute)
    fp8 = run.fp8 if fp8 is None else fp8 and run.fp8
    e, h, T = run.param_bytes, run.hidden_size, _tokens(run)
    a8 = _saved_input_bytes(run, fp8)
    rows = T / _sp(run)  # sequence-sharded tensors
    q, kv = _widths(run)
    S, b = run.seq_length // run.context_parallel, run.micro_batch_size
    local_heads = run.num_attention_heads / run.tensor_parallel
    terms: dict[str, float] = {}
    if run.layer_spec == "local":
        # torch's RMSNorm keeps an fp32 copy of its input, the fp32 normalised input and fp32
        # 1/rms; the linear layer after it (a MoE layer's router) keeps the norm's output.
        terms["norms"] = 2 * rows * (2 * _FP32 * h + _FP32 + e * h)
        terms["rope"] = 4 * S * run.kv_channels * e  # cos and sin, for Q and for K
    else:
        # Transformer Engine's LayerNormLinear keeps its input, its output (FP8 with FP8) and
        # fp32 1/rms; a MoE layer's TENorm its input and 1/rms, the router its output; fused
        # RoPE keeps only the frequencies, shared by all layers.
        second = e if moe else a8
        terms["norms"] = rows * (2 * e * h + (a8 + second) * h + 2 * _FP32)
        terms["rope"] = 0.0
    terms["qk_norms"] = qk_norm_activations(run)
    if recompute == "selective":
        # The checkpoint keeps Q and K (after RoPE) and V, a view that keeps the whole QKV
        # projection output [s, b, (a + 2g) d / tp] alive.
        terms["attention"] = T * e * (q + kv + (q + 2 * kv))
    elif run.layer_spec == "local":
        # Q, and K and V repeated to every query head (GQA) or, without GQA, K and V itself
        # (V a view of the QKV output); the fp32 softmax [b, a/tp, s, s] and its copy in the
        # activation dtype, which the product with V keeps.
        k_v = 2 * q if run.num_attention_heads > run.num_query_groups else q + (q + 2 * kv)
        terms["attention"] = T * e * (q + k_v) + _local_scores(run)
    else:
        # Flash attention keeps Q, K, V and the fp32 log-sum-exp [b, a/tp, s].
        terms["attention"] = T * e * (q + 2 * kv) + b * local_heads * S * _FP32
    # Flash attention keeps its output O (bf16), which is also the projection's input; with FP8
    # the projection saves an FP8 copy of it (O is then kept by attention alone, or by nobody
    # when selective recompute re-creates it).
    kept_output = 0 if fp8 and recompute == "selective" else e
    terms["projection"] = T * q * (kept_output + (a8 if fp8 else 0))
    if moe:
        terms.update(moe_activations(run, fp8))
        return terms
    # SwiGLU, fused (megatron/core/fusions/fused_bias_swiglu.py: SwiGLUFunction saves only its
    # input, fc1's output, 2 ffn wide), or unfused (transformer/mlp.py: glu(): also
    # x_linear + glu_linear_offset and SiLU's output); then fc2 saves its input (FP8 with FP8).
    ffn = run.ffn_hidden_size / run.tensor_parallel
    terms["mlp"] = T * ffn * ((2 if run.fused_swiglu else 4) * e + a8)
    return terms


def lora_layer_activations(run: Run, recompute: Optional[str] = None) -> dict[str, float]:
    """Bytes one layer of a LoRA run keeps for the backward of one micro-batch, by term
    (Megatron-Core's local layers; the base frozen, so a linear keeps no input:
    ``linear_with_frozen_weight``):

    * ``input_norm``, ``pre_mlp_norm``: torch's RMSNorm with a frozen weight keeps an fp32 copy
      of its input ``[s / sp, b, h]`` and fp32 1/rms, not the normalised output (which only the
      weight's gradient needs);
    * ``qk_norms`` (:func:`qk_norm_activations`), ``rope`` and ``attention`` as in
      :func:`layer_activations` (``recompute``: None or ``"selective"``);
    * ``mlp``: the SwiGLU's own (fused: fc1's output; unfused: also the linear half plus 0 and
      SiLU's output), not fc2's input;
    * ``lora_<linear>``: each target's adapter
      (:func:`megatron_gift.planning.lora.adapter_activations`), the inputs of those linears
      among what it keeps.

    The model's first layer keeps what every layer keeps: the frozen embedding's output asks
    for a gradient (``megatron_gift.core.lora.freeze_base``).
    """
    e, h, T = run.param_bytes, run.hidden_size, _tokens(run)
    base = layer_activations(replace(run, lora_rank=None), recompute)
    norm = T / _sp(run) * (_FP32 * h + _FP32)
    ffn = run.ffn_hidden_size / run.tensor_parallel
    terms = {"input_norm": norm, "pre_mlp_norm": norm, "qk_norms": qk_norm_activations(run),
             "rope": base["rope"], "attention": base["attention"],
             "mlp": T * ffn * (2 if run.fused_swiglu else 4) * e}
    for name in lora.TARGET_ORDER:
        if name in run.lora_targets:
            terms[f"lora_{name}"] = lora.adapter_activations(run, name, T)
    return terms


def qk_norm_activations(run: Run) -> float:
    """What Qwen3's query and key RMSNorms (``qk_layernorm``) keep for one micro-batch, over
    the ``(a + g) / tp`` heads of each of the ``T`` tokens: torch's RMSNorm (local layers) an
    fp32 copy of its input, the fp32 normalised input (not with LoRA's frozen weight) and fp32
    1/rms; Transformer Engine's (``ops.RMSNorm``) a contiguous copy of its input and fp32
    1/rms. 0 without the norms."""
    if not run.qk_layernorm:
        return 0.0
    d = run.kv_channels
    heads = (run.num_attention_heads + run.num_query_groups) / run.tensor_parallel
    local = (1 if run.lora else 2) * _FP32 * d
    per_head = (local if run.layer_spec == "local" else run.param_bytes * d) + _FP32
    return _tokens(run) * heads * per_head


def moe_tokens(run: Run) -> float:
    """Token copies the local experts of one GPU take from one micro-batch: the ``rows x ETP``
    tokens of its expert-TP group (``rows``: ``T / sp``, gathered over the experts' TP), each
    to ``topk`` experts, ``E / EP`` of them here, from each of the EP ranks' as many tokens:
    ``rows x ETP x topk`` for a perfectly balanced router, times :attr:`Run.moe_imbalance`."""
    rows = _tokens(run) / _sp(run)
    return rows * run.etp * run.moe_topk * run.moe_imbalance


def moe_activations(run: Run, fp8: bool = False) -> dict[str, float]:
    """Bytes a MoE layer's router, token dispatcher and local experts keep for one micro-batch
    (Megatron-Core 0.19, transformer/moe/), beside the norms and attention of
    :func:`layer_activations`; ``n`` = :func:`moe_tokens`, ``rows`` = ``T / sp``.

    * ``router`` (router.py ``TopKRouter.routing``, moe_utils.py
      ``topk_routing_with_score_function``): the top-k indices int64 ``[rows, k]`` and the
      softmax fp32 of the k chosen logits ``[rows, k]`` (pre-softmax: of all ``[rows, E]``);
      with a load-balancing loss (``compute_routing_scores_for_aux_loss``) its own softmax
      ``[rows, E]`` (its top-k's indices go with the unused values), the tokens per expert int64
      ``[E]`` (per sequence ``[b E]``) and the loss. The gate's input is the norm's output
      (counted in ``norms``);
    * ``dispatch``: on CUDA the all-to-all dispatcher (token_dispatcher.py
      ``MoEAlltoAllTokenDispatcher``; ``permute`` keeps two int64 indices of the ``rows x k``
      copies, one for the tokens, one for the probabilities), on a CPU the all-gather one
      (``MoEAllGatherTokenDispatcher``: ``permute``'s int64 index of the ``n`` copies and
      ``masked_select``'s inputs, the local probabilities and map transposed
      ``[E / EP, rows x ETP x EP]`` in the activation dtype and bool); both keep the ``n``
      permuted probabilities, which scale each expert's SwiGLU output;
    * ``experts`` (experts.py ``SequentialMLP``, one ``MLP`` an expert on its share of the
      ``n`` tokens): fc1's input ``[n, h]`` (FP8 with FP8), then as the dense SwiGLU at width
      ``moe_ffn / ETP`` with the probabilities applied: fused
      (``weighted_bias_swiglu_impl``) fc1's output; unfused also the linear half plus 0,
      SiLU's output and their product; and fc2's input (FP8 with FP8).

    Not counted: the gathered or exchanged tokens no op keeps (the all-gather dispatcher's
    global buffer, the all-to-all's send buffer), and FP8's padding of each expert's tokens to
    a multiple of 16.
    """
    e, h, E, k = run.param_bytes, run.hidden_size, run.num_experts, run.moe_topk
    a8 = _saved_input_bytes(run, fp8)
    rows, n = _tokens(run) / _sp(run), moe_tokens(run)
    router = rows * ((_FP32 * E if run.moe_pre_softmax else _FP32 * k) + 8 * k)
    if run.moe_aux_loss is not None:
        per_expert = run.micro_batch_size if run.moe_aux_loss == "seq_aux_loss" else 1
        router += rows * _FP32 * E + 8 * E * per_expert + _FP32
    if run.device == "cuda":
        dispatch = 2 * 8 * rows * k + n * e
    else:
        dispatch = 8 * n + E * rows * run.etp * (e + 1) + n * e
    ffn = run.moe_ffn_hidden_size / run.etp
    experts = n * (a8 * h + ffn * ((2 if run.fused_swiglu else 5) * e + a8))
    return {"router": router, "dispatch": dispatch, "experts": experts}


def _local_scores(run: Run) -> float:
    """The local attention's fp32 softmax ``[b, a/tp, s, s]`` and its copy in the activation
    dtype (bf16 runs), which the product with V keeps."""
    S = run.seq_length // run.context_parallel
    e = run.param_bytes
    return (run.micro_batch_size * run.num_attention_heads / run.tensor_parallel * S * S
            * (_FP32 + (e if e != _FP32 else 0)))


def local_attention_workspace(run: Run) -> int:
    """Bytes the local attention (Megatron-Core's ``DotProductAttention``: LoRA runs, and the
    CPU's) holds beyond what it keeps (:func:`_local_scores`), once a GPU, in ``[b, a/tp, s,
    s]`` tensors: the ``"mpu"`` buffer its raw scores take as ``baddbmm``'s ``beta=0`` input
    (in the activation dtype, allocated once and kept: ``GlobalMemoryBuffer``) and, at its
    peak, forward or backward alike (measured: ``tests/test_plan.py``), in bf16 the fp32
    softmax, its fp32 gradient and the fp32 gradient of its input: ``12 + e`` bytes an element
    in all; in fp32, where the mask is filled in place in a view of the raw scores, the
    backward of that view (``CopySlices``) holds four fp32 tensors beside the buffer: 20
    bytes. Less what it keeps. Apex's fused softmax kernels (``masked_softmax_fusion``) need
    less. 0 with Transformer Engine's layers (flash attention: no ``s x s`` tensor)."""
    if run.layer_spec != "local":
        return 0
    S = run.seq_length // run.context_parallel
    elements = run.micro_batch_size * run.num_attention_heads // run.tensor_parallel * S * S
    e = run.param_bytes
    peak = 3 * _FP32 + e if e != _FP32 else 5 * _FP32
    return math.ceil(elements * peak - _local_scores(run))


def _layer_total(run: Run, layer: int, recompute: Optional[str] = None,
                 fp8: Optional[bool] = None) -> float:
    """:func:`layer_activations` of the layer of global index ``layer``, summed."""
    return sum(layer_activations(run, recompute, fp8, is_moe_layer(run, layer)).values())


def recompute_working_set(run: Run, layers: range, holds_head: bool = False,
                          fp8: Optional[bool] = None) -> float:
    """Bytes by which a recomputing backward raises a stage's peak above its forward's, for
    one micro-batch; ``layers``: the global indices of the chunk whose backward recomputes
    first; ``holds_head``: the stage ends with the final norm and output layer; ``fp8``: its
    layers run FP8 (default: as the run does).

    The backward frees as it goes, so only what it re-creates beyond what it has freed by then
    counts: uniform full recompute re-creates a group of ``N`` layers first (after the head;
    the largest group is counted); block recompute one layer, after the layers the chunk kept;
    selective recompute one core attention, after that layer's MLP, second norm and projection
    input. 0 without recompute.
    """
    granularity = run.recompute_granularity
    if granularity is None:
        return 0.0
    freed = head_activations(run) if holds_head else 0.0
    totals = [_layer_total(run, i, fp8=fp8) for i in layers]
    n = min(run.recompute_num_layers or 1, len(totals))
    if granularity == "full" and run.recompute_method == "block":
        again, freed = totals[n - 1], freed + sum(totals[n:])
    elif granularity == "full":
        again = max(sum(totals[i:i + n]) for i in range(0, len(totals), n))
    else:
        e, T = run.param_bytes, _tokens(run)
        q, kv = _widths(run)
        if run.layer_spec == "local":  # the scores, and K and V repeated for GQA
            repeated = T * e * 2 * q if run.num_attention_heads > run.num_query_groups else 0.0
            again = _local_scores(run) + repeated
        else:  # flash attention again: a contiguous V, its output and the log-sum-exp
            S, b = run.seq_length // run.context_parallel, run.micro_batch_size
            again = T * e * (kv + q) + b * run.num_attention_heads / run.tensor_parallel * S * _FP32
        kept = layer_activations(run, "selective", fp8, is_moe_layer(run, layers[-1]))
        freed += (sum(kept.get(term, 0.0) for term in _FREED_BEFORE_ATTENTION)
                  + kept.get("norms", 0.0) / 2)
    return max(again - freed, 0.0)


def embedding_activations(run: Run) -> float:
    """What the embedding keeps for one micro-batch: the token ids (int64), and with TP the
    bool mask of the ids outside this rank's vocab shard; nothing with LoRA (its weight is
    frozen)."""
    if run.lora:
        return 0.0
    return _tokens(run) * (8 + (1 if run.tensor_parallel > 1 else 0))


def head_activations(run: Run) -> float:
    """What the final norm and the output layer keep for one micro-batch (the loss's buffers
    are :func:`loss_terms`); with LoRA the frozen norm's fp32 input and 1/rms alone, the frozen
    output layer keeps nothing (:func:`lora_layer_activations`)."""
    e, h, rows = run.param_bytes, run.hidden_size, _tokens(run) / _sp(run)
    if run.lora:
        return rows * (_FP32 * h + _FP32)
    if run.layer_spec == "local":  # as a local norm + linear (layer_activations)
        return rows * (2 * _FP32 * h + _FP32 + e * h)
    return rows * (2 * e * h + _FP32)  # TE's norm keeps input and 1/rms, the layer its input


def chunk_activations(run: Run, layers: range, pre_process: bool,
                      post_process: bool) -> float:
    """Bytes one forward pass of a model chunk of the layers of global indices ``layers``
    keeps for its backward (one micro-batch), the embedding's and the head's parts included
    where it has them; each layer as it is: FP8 or a bf16 edge layer, dense or MoE."""
    e, h = run.param_bytes, run.hidden_size
    S = run.seq_length // run.context_parallel
    kinds = [(is_fp8_layer(run, i), is_moe_layer(run, i)) for i in layers]

    def kept(chosen: list[tuple[bool, bool]], recompute: Optional[str] = None) -> float:
        return sum(count * sum(layer_activations(run, recompute, fp8, moe).values())
                   for (fp8, moe), count in Counter(chosen).items())

    if run.recompute_granularity == "full":
        checkpoint = _tokens(run) / _sp(run) * e * h  # a checkpoint keeps its hidden input
        n = run.recompute_num_layers
        if run.recompute_method == "block":  # the first n layers recomputed, the rest kept
            total = min(n, len(kinds)) * checkpoint + kept(kinds[n:])
        else:
            total = math.ceil(len(kinds) / n) * checkpoint
        total += S * run.kv_channels * _FP32  # the rotary frequencies, a checkpoint argument
    else:
        total = kept(kinds, run.recompute_granularity)
    # The bool attention mask [1 or b, 1, s, s], shared by the chunk's layers, is kept by the
    # local attention and by recompute checkpoints.
    if run.layer_spec == "local" or run.recompute_granularity is not None:
        total += (run.micro_batch_size if run.packed else 1) * S * S
    if pre_process:
        total += embedding_activations(run)
    if post_process:
        total += head_activations(run)
    return total


def interleaved_chunks_in_flight(run: Run, rank: int) -> list[int]:
    """With VPP: for each model chunk of stage ``rank``, the most forwards of that chunk held
    at once, from Megatron-Core's interleaved order (groups of PP micro-batches per chunk,
    the backward in reverse chunk order, warm-up then one forward and one backward)."""
    pp, chunks, m = run.pipeline_parallel, run.chunks, run.micro_batches
    total, warmup = m * chunks, in_flight(run, rank) - 1
    warmup = total if in_flight(run, rank) >= total else warmup

    def chunk(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, pp * chunks)
        c = within // pp
        return (chunks - 1 - c if backward else c), group * pp + within % pp

    held: set[tuple[int, int]] = set()
    count, most = [0] * chunks, [0] * chunks
    backwards = 0
    for k in range(total):
        forward = chunk(k, backward=False)
        held.add(forward)
        count[forward[0]] += 1
        most[forward[0]] = max(most[forward[0]], count[forward[0]])
        if k >= warmup:
            backward = chunk(backwards, backward=True)
            if backward in held:
                held.remove(backward)
                count[backward[0]] -= 1
            backwards += 1
    return most


def stage_activations(run: Run, rank: int) -> int:
    """Activation bytes on one GPU of stage ``rank`` at its peak: every forward in flight plus
    the recompute working set. With VPP, the forwards in flight count at the size of the
    stage's smallest chunk, and each chunk's extras over it (the embedding, the head, bf16
    edge layers in an FP8 run, MoE layers where the chunks differ) for the forwards of that
    chunk that are in flight at once."""
    flights = in_flight(run, rank)
    pre, post = rank == 0, rank == run.pipeline_parallel - 1
    chunks = _stage_chunks(run, rank)
    own = [chunk_activations(run, chunk_layers(run, v), False, False) for v in chunks]
    base = min(own)
    most = ([flights] if run.virtual_pipeline is None
            else interleaved_chunks_in_flight(run, rank))
    total = flights * base + sum(count * (o - base) for count, o in zip(most, own))
    if pre:
        total += most[0] * embedding_activations(run)
    if post:
        total += most[-1] * head_activations(run)
    bf16_edges = run.fp8 and stage_fp8_layers(run, rank) < len(_stage_layers(run, rank))
    # The backward of the last chunk's forward recomputes first; on the last stage after the
    # head (with VPP the first chunk's recompute may come without it: counted as without).
    holds_head = post and run.virtual_pipeline is None
    working_set = recompute_working_set(run, chunk_layers(run, chunks[-1]), holds_head,
                                        fp8=run.fp8 and not bf16_edges)
    return math.ceil(total + working_set)


# ----------------------------------------------------------------------------------------------
# Pipeline and loss buffers


def pipeline_buffer_bytes(run: Run, rank: int) -> int:
    """Hidden states kept between stages on one GPU of stage ``rank``: for each forward in
    flight the received tensor (Megatron keeps it until the backward; the sent one is freed
    once sent, ``deallocate_pipeline_outputs``: schedules.py ``deallocate_output_tensor``),
    ``[s / cp / sp, b, h]`` plus the reference's ``h`` beside it, and the two gradient buffers
    of a backward step."""
    pp = run.pipeline_parallel
    if pp == 1:
        return 0
    width = run.hidden_size * (2 if run.reference else 1)
    one = _tokens(run) // _sp(run) * width * run.param_bytes
    receives = rank > 0 or run.virtual_pipeline is not None
    return (int(receives) * in_flight(run, rank) + 2) * one


def loss_terms(run: Run) -> dict[str, int]:
    """Bytes of the last stage's loss for one micro-batch on its worst TP rank, by term, for
    the head the run asks for: :func:`logits_loss_terms` or :func:`fused_head_terms`."""
    return fused_head_terms(run) if run.head == "fused" else logits_loss_terms(run)


def logits_loss_terms(run: Run) -> dict[str, int]:
    """Bytes of the logits head's loss for one micro-batch (worst TP rank: the one whose vocab
    shard is all real tokens): ``logits`` and ``reference_logits`` ``[b, s, V/tp]``, ``saved``
    (fp32 ``softmax - g p'`` over the real vocab columns, and per token the label column,
    ``1 - g`` and the valid flag) and ``workspace`` (two fp32 row-chunks)."""
    T = _tokens(run)
    shard = run.padded_vocab // run.tensor_parallel
    real = min(shard, run.vocab_size)
    logits = T * shard * run.param_bytes
    rows = min(T, max(1, LOSS_WORKSPACE_ELEMENTS[run.device] // max(1, real)))
    return {"logits": logits, "reference_logits": logits if run.reference else 0,
            "saved": T * real * _FP32 + T * (8 + _FP32 + 1),
            "workspace": 2 * rows * real * _FP32}


# The fused head (megatron_gift.loss.fused_head, _FusedGiftHead) on one micro-batch, worst TP
# rank. T: tokens of the micro-batch on the last stage (s / cp x b: with sequence parallelism
# the head takes the gathered sequence); V_l = V_pad / tp rows of each output weight; R: real
# vocab columns of the worst rank; c = min(chunk, T); e: bytes of the parameter dtype.


def fused_head_chunk_tokens(run: Run) -> int:
    """Tokens per chunk of the fused head: ``gift.head_chunk_tokens``, else as many as keep
    one fp32 ``[chunk, V/tp]`` tile within :data:`FUSED_HEAD_TILE_BYTES` and at most an eighth
    of the micro-batch's tokens (the loss's ``default_chunk_tokens``), at least 1."""
    if run.head_chunk_tokens is not None:
        return run.head_chunk_tokens
    shard = run.padded_vocab // run.tensor_parallel
    chunk = min(FUSED_HEAD_TILE_BYTES // (_FP32 * max(1, shard)), -(-_tokens(run) // 8))
    return max(1, chunk)


def _fused_gemms_in_param_dtype(run: Run) -> bool:
    """Whether the head's GEMMs take bf16 weights as they are (``_multiplies_in_low_precision``:
    CUDA's fp32-accumulating ``out_dtype`` GEMMs); elsewhere a bf16 weight is copied to fp32."""
    return run.device == "cuda" and run.param_bytes != _FP32


def fused_head_tiles(run: Run) -> int:
    """The forward's largest set of live ``[c, R]`` tiles, the most over the phases of a
    chunk. Each model's logits ``z``, ``r`` are fp32 (``_logits``); then, on CPU, the eager
    passes (``_eager_chunk``: ``_statistics`` makes ``exp(z)``, its row sums of products are
    batched GEMMs, the gradient tile is written over ``z``) and, on CUDA, the loss's Triton passes (``_kernel_chunk``, which the
    loss's ``auto`` picks there: a new fp32 gap ``softmax(z) - q`` and a new fp32 gradient
    tile). A chunk's tiles are released before the next chunk's logits are made.

    * statistics: ``z``, ``r``, and ``exp(z)`` (eager) or the gap with the gradient tile
      (Triton): 3 fp32 tiles eager, 4 Triton (one fewer without a reference);
    * logits: ``z`` and ``r``, plus the fp32 copy of the ``[c, H]`` hidden chunk where the
      GEMMs run in fp32 on bf16;
    * gradient (``G @ W``, ``G^T h``): ``z``, ``r`` and (Triton) the gradient tile, the
      ``[c, H]`` fp32 GEMM output (or fp32 hidden chunk) and, where the GEMMs take bf16
      weights, the tile cast to the parameter dtype (``_mm``/``_addmm_``: ``a.to(b.dtype)``).
    """
    T, H, e = _tokens(run), run.hidden_size, run.param_bytes
    c = min(fused_head_chunk_tokens(run), T)
    real = min(run.padded_vocab // run.tensor_parallel, run.vocab_size)
    tile = c * real * _FP32
    models = 1 + int(run.reference)
    triton = run.device == "cuda"
    low_precision = _fused_gemms_in_param_dtype(run)
    hidden_chunk = c * H * _FP32
    statistics = (models + (2 if triton else 1)) * tile
    logits = models * tile + (hidden_chunk if e != _FP32 and not low_precision else 0)
    gradient = (models + int(triton)) * tile + (c * real * e if low_precision else 0) + hidden_chunk
    return max(statistics, logits, gradient)


def fused_head_forward_workspace(run: Run) -> dict[str, int]:
    """What the fused head's forward holds beside what it saves, freed when it returns:
    ``tiles`` (:func:`fused_head_tiles`); ``weight_copies``: an fp32 copy ``[V_l, H]`` of
    each model's bf16 output weight where the GEMMs do not take bf16 (``_gemm_operand``: CPU;
    none with fp32 parameters or on CUDA); ``hidden_copies``: with micro-batches of more than
    one sequence, each model's hidden states ``[T, H]`` in the parameter dtype, which the
    head's ``reshape(-1, H)`` copies (the caller hands ``[s, b, H]`` transposed to
    ``[b, s, H]``)."""
    T, H, e = _tokens(run), run.hidden_size, run.param_bytes
    models = 1 + int(run.reference)
    rows = run.padded_vocab // run.tensor_parallel
    copies = e != _FP32 and not _fused_gemms_in_param_dtype(run)
    return {"tiles": fused_head_tiles(run),
            "weight_copies": models * rows * H * _FP32 if copies else 0,
            "hidden_copies": models * T * H * e if run.micro_batch_size > 1 else 0}


def fused_head_backward_outputs(run: Run) -> int:
    """What the fused head's backward allocates (with the upstream gradient one value over the
    tokens, as ``loss.sum().backward()`` gives: the saved sums are scaled, nothing
    recomputed): the per-token scale ``[T]`` fp32; the hidden states' gradient ``[T, H]`` in
    the parameter dtype, cast from an fp32 product (both live during the cast with bf16); the
    weight's gradient ``[V_l, H]`` in the parameter dtype, cast from the saved fp32 sum (with
    gradient-accumulation fusion: the sum added to ``main_grad`` and a zero gradient of the
    same size returned). With fp32 parameters the product and the saved sum are returned as
    they are (left out: the zero fp32 gradient of fp32 parameters with the fusion). With LoRA
    the output weight is frozen: no weight gradient."""
    T, H, e = _tokens(run), run.hidden_size, run.param_bytes
    rows = run.padded_vocab // run.tensor_parallel
    hidden = T * H * e
    product = T * H * _FP32 if e != _FP32 else 0
    weight = rows * H * e if e != _FP32 and not run.lora else 0
    return T * _FP32 + max(product + hidden, hidden + weight)


def fused_head_per_token_bytes(run: Run) -> int:
    """Bytes a token of what the fused head keeps for the backward beside the gradients: the
    loss and its three diagnostics (``[4, T]`` fp32) and the ``_Coefficients``: ``maxima``
    ``[T, 2]`` fp32, ``inv_sum_exp_z`` fp32, ``onehot_w`` fp32, ``column`` int64, ``valid``
    bool, and with a reference ``ref_w`` fp32 (and ``uniform_w`` fp32 with smoothing)."""
    coefficients = 2 * _FP32 + _FP32 + _FP32 + 8 + 1
    if run.reference:
        coefficients += _FP32 * (2 if run.smooth else 1)
    return 4 * _FP32 + coefficients


def fused_head_terms(run: Run) -> dict[str, int]:
    """Bytes of the fused head (``gift.head: fused``) for one micro-batch on the worst TP rank,
    by term; their sum is the head's peak: what it keeps from the forward to the backward,
    plus the larger of the forward's workspace and the backward's outputs.

    * ``grad_weight``: the fp32 ``[V_l, H]`` sum ``G^T h`` the forward accumulates and saves
      (none with LoRA: the output weight is frozen, ``needs_input_grad`` says so);
    * ``grad_hidden``: the fp32 ``[T, H]`` rows ``G @ W`` it saves;
    * ``per_token``: the loss, its diagnostics and the coefficients
      (:func:`fused_head_per_token_bytes`);
    * ``reference_hidden``: the reference's final hidden states ``[T, H]`` in the parameter
      dtype, saved for the backward (the logits head frees them once the reference's logits
      exist); none without a reference;
    * ``gathered_hidden``: with sequence parallelism, the student's gathered hidden states
      ``[T, H]`` the head saves, beyond the ``[T / tp, H]`` the output layer would keep
      (counted in :func:`head_activations`); with LoRA all ``[T, H]`` (a frozen output layer
      keeps nothing);
    * ``tiles``, ``weight_copies``, ``hidden_copies``: the forward's workspace
      (:func:`fused_head_forward_workspace`);
    * ``backward_excess``: what the backward's outputs (:func:`fused_head_backward_outputs`)
      need beyond the forward's workspace, 0 where the forward's peak is the higher.

    Not counted: ``[c]``-sized row temporaries, the ``[c, 7]`` statistics and the forward's
    per-token index tensors (labels masks, ``[T]``, freed as it returns), and the
    recomputing backward of a per-token upstream gradient (two more tiles a chunk and a
    second fp32 ``[V_l, H]`` sum).
    """
    T, H, e = _tokens(run), run.hidden_size, run.param_bytes
    rows = run.padded_vocab // run.tensor_parallel
    forward = fused_head_forward_workspace(run)
    backward = fused_head_backward_outputs(run)
    return {"grad_weight": 0 if run.lora else rows * H * _FP32, "grad_hidden": T * H * _FP32,
            "per_token": T * fused_head_per_token_bytes(run),
            "reference_hidden": T * H * e if run.reference else 0,
            "gathered_hidden": (T - (0 if run.lora else T // _sp(run))) * H * e,
            **forward, "backward_excess": max(0, backward - sum(forward.values()))}


# ----------------------------------------------------------------------------------------------
# Plans


def fp8_weight_bytes(run: Run, trainable: bool) -> float:
    """Bytes per GEMM parameter of the FP8 copies Transformer Engine keeps of a weight: the
    FP8 data and, for a weight that gets a gradient, its transpose (Hopper's FP8 GEMM takes
    only "TN" operands, so dgrad and wgrad need the transposed FP8 weight; blockwise and MXFP8
    keep a columnwise copy instead). 0 without FP8.

    TE 2.x ``_Linear.forward`` (module/linear.py) sets ``weight_quantizer.set_usage(rowwise=
    True, columnwise=is_grad_enabled and inp.requires_grad)`` and takes the weight from
    ``TransformerEngineBaseModule.get_weight_workspace`` (module/base.py): cached under
    ``"weight"`` and re-quantized only on the first micro-batch of a step when Megatron-Core
    passes ``is_first_microbatch`` (extensions/transformer_engine.py ``TELinear.forward``), so
    one copy per layer whatever the micro-batches in flight. The frozen reference runs under
    ``no_grad``: its copy has no transpose.
    """
    if not run.fp8:
        return 0.0
    return _FP8_WEIGHT_BYTES[run.fp8_recipe] * (2 if trainable else 1)


def fp8_scaling_bytes(run: Run) -> int:
    """Bytes of one FP8 GEMM module's scaling state: delayed scaling keeps, per quantizer slot
    (:data:`_FP8_SLOTS_PER_GEMM`), an fp32 amax history of ``fp8_amax_history_len``, an fp32
    scale and its amax in the reduction buffer (TE 2.x recipe state
    ``DelayedScalingRecipeState``: ``amax_history [len, slots]``, ``scale [slots]``;
    ``FP8GlobalStateManager.reduce_and_update_fp8_tensors`` concatenates the amaxes);
    tensorwise (current scaling) an fp32 scale and amax per slot
    (``Float8CurrentScalingQuantizer``); blockwise and MXFP8 none (their scales travel with
    the data)."""
    if not run.fp8:
        return 0
    per_slot = {"delayed": run.fp8_amax_history_len + 2, "tensorwise": 2}.get(run.fp8_recipe, 0)
    return _FP8_SLOTS_PER_GEMM * per_slot * _FP32


def fp8_state_bytes(run: Run, rank: int) -> int:
    """What Transformer Engine keeps for FP8 on one GPU of stage ``rank`` beside the weights
    (:func:`plan_stage` counts FP8 weights themselves): for the student, the FP8 copy and its
    transpose of each FP8 layer's GEMM weights, or with ``--fp8-param-gather`` (FP8 weights)
    the transpose alone (Megatron-Core's ``fp8_utils.post_all_gather_processing`` creates it
    after the parameter all-gather); for a reference in FP8, one more copy (bf16 weights: the
    cached FP8 data; FP8 weights: the transpose TE made when it built them with both usages and
    keeps, since ``get_weight_workspace`` adds usages to an FP8 parameter but never drops
    them); and every FP8 GEMM module's scaling state (:func:`fp8_scaling_bytes`)."""
    if not run.fp8:
        return 0
    gemm, modules = stage_fp8_gemms(run, rank)
    copy = fp8_weight_bytes(run, trainable=False)
    student = gemm * (copy if run.fp8_param else fp8_weight_bytes(run, trainable=True))
    reference = gemm * copy if run.reference and run.reference_fp8 else 0
    models = 1 + int(run.reference and run.reference_fp8)
    scaling = models * modules * fp8_scaling_bytes(run)
    return math.ceil(student + reference) + scaling


def weight_bytes(run: Run, parameters: int, rank: int, fp8_weights: bool) -> int:
    """Bytes of a model's ``parameters`` on one GPU of stage ``rank``: the parameter dtype,
    or with ``fp8_weights`` (``fp8_param``: TE's ``fp8_model_init``) one FP8 copy for the GEMM
    weights of its FP8 layers (Megatron-Core's DDP buffer holds them as uint8)."""
    if not (fp8_weights and run.fp8):
        return parameters * run.param_bytes
    gemm = stage_fp8_gemms(run, rank)[0]
    fp8 = gemm * fp8_weight_bytes(run, trainable=False)
    return math.ceil((parameters - gemm) * run.param_bytes + fp8)


def reference_weight_bytes(run: Run, rank: int) -> int:
    """The frozen reference's weights on one GPU of stage ``rank``: the student's shard (FP8
    with ``--reference-fp8-weights``); none without a reference, and none with LoRA, whose
    reference is the student's own base (adapters off: ``GiftModel._base_forward``)."""
    if not run.reference or run.lora:
        return 0
    return weight_bytes(run, stage_parameters(run, rank), rank, run.reference_fp8_weights)


def plan_stage(run: Run, rank: int) -> StagePlan:
    """Bytes by part on one GPU of pipeline stage ``rank``: gradients and optimizer state for
    the parameters that train (:func:`stage_trained_parameters`), the activations with the
    local attention's workspace (:func:`local_attention_workspace`)."""
    params, experts = stage_parameters(run, rank), stage_expert_parameters(run, rank)
    trained = stage_trained_parameters(run, rank)
    parts = {
        "student_weights": weight_bytes(run, params, rank, run.fp8_param),
        "gradients": gradient_bytes(run, trained, experts),
        "optimizer": optimizer_bytes(run, trained, experts),
        "reference_weights": reference_weight_bytes(run, rank),
        "activations": stage_activations(run, rank) + local_attention_workspace(run),
        "pipeline_buffers": pipeline_buffer_bytes(run, rank),
        "loss_buffers": (sum(loss_terms(run).values())
                         if rank == run.pipeline_parallel - 1 else 0),
        "fp8_state": fp8_state_bytes(run, rank),
    }
    parts["total"] = sum(parts.values())
    return StagePlan(rank, params, parts, in_flight(run, rank))


def plan(run: Run, gpu_memory_bytes: int = 80 * GIB, suggest: bool = True) -> Plan:
    """The plan of ``run``: stages worst first; when the worst does not fit in
    :data:`USABLE_FRACTION` of ``gpu_memory_bytes``, the cheapest layout that does
    (:func:`suggestion_cost`, re-planned), if ``suggest``."""
    stages = sorted((plan_stage(run, r) for r in range(run.pipeline_parallel)),
                    key=lambda s: (-s.bytes["total"], s.pipeline_rank))
    result = Plan(run, total_parameters(run), stages, gpu_memory_bytes,
                  fits=stages[0].bytes["total"] <= gpu_memory_bytes * USABLE_FRACTION)
    if suggest and not result.fits:
        result.suggestion, result.suggested_run = _suggest(run, gpu_memory_bytes)
    return result


def _worst_total(run: Run, above: float = math.inf) -> int:
    """The worst stage's total bytes, or the first total found above ``above`` (then the
    stages are not all planned): the first and last stage, usually the worst, go first."""
    last = run.pipeline_parallel - 1
    worst = 0
    for rank in (0, *range(last, 0, -1)):
        worst = max(worst, plan_stage(run, rank).bytes["total"])
        if worst > above:
            break
    return worst


# ----------------------------------------------------------------------------------------------
# Stopping: the time a SIGTERM asks for (the step in progress, then a save)

# Assumed, not measured: the dense bf16 FLOP/s one H100 sustains in training (a quarter of its
# 989 TFLOP/s peak; FP8 counted as bf16), and what one node writes to the shared file system
# the checkpoint goes to, in bytes/s (an NFS-class file system gives less: allow more time).
ASSUMED_GPU_FLOPS = 250e12
ASSUMED_NODE_WRITE_BYTES = 2e9
# The least a launcher should wait for a stopping run, by student parameters (at least, s):
# a 70B-class save writes about 1 TB.
SHUTDOWN_FLOORS = ((70e9, 600), (1e9, 300), (0, 60))


def step_flops(run: Run) -> float:
    """FLOPs of one training step, all GPUs together: the student's forward and backward
    (``6 N`` a token, N the parameters a token goes through: :func:`active_parameters`; with
    LoRA ``4 N`` for the frozen base, whose backward computes no weight gradient, and ``6 N``
    for the adapters), the reference's forward (``2 N``), recompute's second forward, and the
    attention scores ``4 s a d`` a token and layer forward (not halved for causality)."""
    tokens = run.global_batch_size * run.seq_length
    n = active_parameters(run)
    scores = 4 * run.seq_length * run.num_attention_heads * run.kv_channels * run.num_layers
    forwards = 3 + int(run.reference)  # backward = 2 forwards
    frozen = n - trained_parameters(run) if run.lora else 0  # a LoRA run's base
    dense = (6 + (2 if run.reference else 0)) * n - 2 * frozen
    if run.recompute_granularity == "full":
        dense, forwards = dense + 2 * n, forwards + 1
    elif run.recompute_granularity == "selective":
        forwards += 1
    return tokens * (dense + forwards * scores)


def checkpoint_bytes(run: Run) -> int:
    """Bytes a save writes: the student's weights in the parameter dtype, fp32 main weights
    (bf16 runs) and the optimizer's moments (the reference is not saved); with LoRA the
    adapters' alone (the checkpoint records where the base is)."""
    n = trained_parameters(run)
    moments = 2 if run.optimizer == "adam" else (1 if run.sgd_momentum else 0)
    main = _FP32 if run.param_bytes != _FP32 else 0
    return n * (run.param_bytes + main + moments * _FP32)


def stop_seconds(run: Run) -> tuple[float, float]:
    """``(step, save)``: seconds of one step on the run's GPUs at :data:`ASSUMED_GPU_FLOPS`,
    and of one save written by its nodes at :data:`ASSUMED_NODE_WRITE_BYTES`."""
    nodes = math.ceil(run.num_gpus / NODE_GPUS)
    return (step_flops(run) / (run.num_gpus * ASSUMED_GPU_FLOPS),
            checkpoint_bytes(run) / (nodes * ASSUMED_NODE_WRITE_BYTES))


def shutdown_timeout(run: Run) -> int:
    """Seconds a launcher (``torchrun --shutdown-timeout``) should give a run it signals to
    finish its step and save: twice the estimate of :func:`stop_seconds`, in whole minutes,
    and at least the floor for the model's size (:data:`SHUTDOWN_FLOORS`)."""
    floor = next(s for size, s in SHUTDOWN_FLOORS if total_parameters(run) >= size)
    return max(floor, 60 * math.ceil(2 * sum(stop_seconds(run)) / 60))


# ----------------------------------------------------------------------------------------------
# Suggestions: the layout that fits on the fewest GPUs

# Tensor parallelism is searched up to the GPUs of one node (or the run's own, if larger).
NODE_GPUS = 8
# Extra compute of each recompute granularity, in the order the suggestion prefers them.
RECOMPUTE_ORDER = (None, "selective", "full")


def tensor_parallel_options(run: Run) -> list[int]:
    """TP sizes searched: powers of two up to :data:`NODE_GPUS` and the run's own, those that
    divide the attention heads, the query groups and the FFN width (as Megatron-Core needs),
    and the experts' width where their TP is TP's."""
    sizes = {run.tensor_parallel, *(1 << k for k in range(NODE_GPUS.bit_length()))}
    experts = run.moe_ffn_hidden_size if run.num_experts and not run.expert_tensor_parallel else 0
    return sorted(t for t in sizes if t <= max(NODE_GPUS, run.tensor_parallel)
                  and not (run.num_attention_heads % t or run.num_query_groups % t
                           or run.ffn_hidden_size % t or experts % t))


def expert_parallel_options(run: Run, tp: int, dp: int) -> list[int]:
    """EP sizes searched at TP ``tp`` and DP ``dp``: those that divide the experts and, times
    the experts' TP, TP x CP x DP (the experts are laid out inside data parallelism); 1 for a
    dense model."""
    etp = run.expert_tensor_parallel or tp
    return [e for e in range(1, run.num_experts + 1)
            if run.num_experts % e == 0 and (tp * run.context_parallel * dp) % (etp * e) == 0
            ] or [1]


def pipeline_parallel_options(run: Run) -> list[int]:
    """PP sizes searched: those that split the layers evenly over PP x VPP stages (with VPP,
    kept as the run has it, at least 2)."""
    return [p for p in range(1, run.num_layers + 1)
            if run.num_layers % (p * run.chunks) == 0 and (p > 1 or run.virtual_pipeline is None)]


def data_parallel_options(run: Run) -> list[int]:
    """DP sizes searched: those that divide the global batch into whole micro-batches."""
    step = run.global_batch_size // run.micro_batch_size
    return [d for d in range(1, step + 1)
            if run.global_batch_size % (run.micro_batch_size * d) == 0]


def _recompute_options(run: Run) -> list[dict[str, Any]]:
    """The run's own recompute and every coarser one (full: uniform, 1 layer per group)."""
    own = {"recompute_granularity": run.recompute_granularity,
           "recompute_method": run.recompute_method,
           "recompute_num_layers": run.recompute_num_layers}
    options = [own]
    if run.recompute_granularity is None:
        options.append({"recompute_granularity": "selective", "recompute_method": None,
                        "recompute_num_layers": None})
    full = {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": 1}
    if own != full:
        options.append(full)
    return options


def _sequence_parallel_options(run: Run, tp: int) -> list[bool]:
    """Sequence parallelism as the run has it or on, where TP > 1 and divides the sequence
    (a MoE model at TP > 1: on, as Megatron-Core's MoE layer needs)."""
    if tp == 1 or run.seq_length % tp:
        return [False]
    return [True] if run.num_experts else sorted({run.sequence_parallel, True})


def layouts(run: Run) -> list[Run]:
    """Every run the suggestion searches: TP (:func:`tensor_parallel_options`) x PP
    (:func:`pipeline_parallel_options`) x DP (:func:`data_parallel_options`) on at least the
    run's GPUs (those it is given), for a MoE model x EP (:func:`expert_parallel_options`),
    each with sequence parallelism, the distributed optimizer and recompute as the run has
    them or turned on. CP, VPP, the experts' TP, the micro-batch and the sequence stay as they
    are."""
    found = []
    cp = run.context_parallel
    for tp in tensor_parallel_options(run):
        for pp in pipeline_parallel_options(run):
            for dp in data_parallel_options(run):
                if tp * pp * cp * dp < run.num_gpus:
                    continue
                for ep, sp in itertools.product(expert_parallel_options(run, tp, dp),
                                                _sequence_parallel_options(run, tp)):
                    for distributed in sorted({run.distributed_optimizer, True}):
                        for recompute in _recompute_options(run):
                            found.append(replace(
                                run, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp,
                                expert_parallel=ep, sequence_parallel=sp,
                                distributed_optimizer=distributed, **recompute))
    return found


def suggestion_flags(run: Run, new: Run) -> list[str]:
    """The flags that turn ``run`` into ``new``."""
    flags = []
    if new.tensor_parallel != run.tensor_parallel:
        flags.append(f"--tensor-model-parallel-size {new.tensor_parallel}")
    if new.pipeline_parallel != run.pipeline_parallel:
        flags.append(f"--pipeline-model-parallel-size {new.pipeline_parallel}")
    if (new.num_gpus, new.data_parallel) != (run.num_gpus, run.data_parallel):
        flags.append(f"--num-gpus {new.num_gpus} (data parallel {new.data_parallel})")
    if new.expert_parallel != run.expert_parallel:
        flags.append(f"--expert-model-parallel-size {new.expert_parallel}")
    if new.sequence_parallel != run.sequence_parallel:
        flags.append("--sequence-parallel" if new.sequence_parallel else "--no-sequence-parallel")
    if new.distributed_optimizer != run.distributed_optimizer:
        flags.append("--use-distributed-optimizer")
    recompute = ("recompute_granularity", "recompute_method", "recompute_num_layers")
    if [getattr(new, k) for k in recompute] == [getattr(run, k) for k in recompute]:
        return flags
    if new.recompute_granularity == "selective":
        flags.append("--recompute-granularity selective")
    else:
        flags.append(f"--recompute-granularity full --recompute-method {new.recompute_method} "
                     f"--recompute-num-layers {new.recompute_num_layers}")
    return flags


def suggestion_cost(run: Run, new: Run) -> tuple:
    """How the suggestion ranks the layouts that fit, cheapest first: fewest GPUs (full
    recompute's third more compute on half the GPUs still takes fewer GPU-hours); then the
    least recompute (none < selective < full: extra compute on every GPU); then the least
    model parallelism TP x PP (less communication and fewer pipeline bubbles at the same GPU
    count); then the least expert parallelism (fewer tokens exchanged between GPUs); then the
    fewest changed flags."""
    return (new.num_gpus, RECOMPUTE_ORDER.index(new.recompute_granularity),
            new.tensor_parallel * new.pipeline_parallel, new.expert_parallel,
            len(suggestion_flags(run, new)), new.tensor_parallel, new.pipeline_parallel)


def _suggest(run: Run, gpu_memory_bytes: int) -> tuple[str, Optional[Run]]:
    """The cheapest layout of :func:`layouts` that fits (by :func:`suggestion_cost`), planned,
    as its flags; else the one that needs the least memory, said not to fit."""
    usable = gpu_memory_bytes * USABLE_FRACTION
    candidates = sorted((c for c in layouts(run) if c != run),
                        key=lambda c: suggestion_cost(run, c))
    if not candidates:
        return "no change of the layout is possible here", None
    for candidate in candidates:
        total = _worst_total(candidate, above=usable)
        if total <= usable:
            flags = " ".join(suggestion_flags(run, candidate))
            return f"{flags} (then {total / GIB:.1f} GiB on the worst GPU)", candidate
    least, least_total = candidates[0], math.inf
    for candidate in candidates:
        total = _worst_total(candidate, above=least_total)
        if total < least_total:
            least, least_total = candidate, total
    flags = " ".join(suggestion_flags(run, least))
    return (f"no change tried fits; the least memory, {least_total / GIB:.1f} GiB on the worst "
            f"GPU, takes {flags}: shorten --seq-length or --micro-batch-size", None)
