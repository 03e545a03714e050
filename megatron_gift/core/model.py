"""The trainable student and its frozen, co-located reference, one pipeline chunk at a time.

Both are Megatron-Core ``GPTModel``s (Llama-style: RoPE, RMSNorm, SwiGLU, GQA) built from the
same ``TransformerConfig`` and layout, so each rank holds the reference shard that matches its
student shard. On a pipeline stage that is not the last, the two hidden states travel together,
concatenated on the hidden dim (``[s, b, 2h]``); the last stage returns both vocab-parallel
logits ``[b, s, V/tp]`` (never gathered). With ``beta = inf`` there is no reference at all.
"""

from typing import NamedTuple, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import TransformerConfig
from omegaconf import DictConfig

from megatron_gift.config.checks import moe_layer_freq
from megatron_gift.core import lora, vocab
from megatron_gift.platform import kernels, te

_Module = TypeVar("_Module", bound=torch.nn.Module)


def transformer_config(config: DictConfig, params_dtype: torch.dtype,
                       initialize: bool = True, frozen: bool = False) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for the run (``config``: the run's OmegaConf).

    ``initialize=False`` builds models without random initialisation (``perform_initialization``
    off): for models whose weights are loaded next, where it would be minutes of wasted work at
    70B. ``frozen``: the config of the reference, which runs under ``no_grad`` and so has no
    activation recompute. Sequence and context parallelism apply to both models alike. Fusions
    are on wherever their kernels are installed (:func:`kernels.fusions`), the fused SwiGLU
    with CUDA; pipeline outputs are freed once sent. The FP8 fields come from the
    ``precision`` section (:func:`fp8_fields`).
    """
    model, parallel, training = config.model, config.parallel, config.training
    recompute = {} if frozen else {
        "recompute_granularity": training.recompute_granularity,
        "recompute_method": training.recompute_method,
        "recompute_num_layers": training.recompute_num_layers}
    vpp = parallel.virtual_pipeline_model_parallel_size
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads,
        add_qkv_bias=model.add_qkv_bias, qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm", layernorm_epsilon=model.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, init_method_std=model.init_method_std,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size, **recompute,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        calculate_per_token_loss=True, use_cpu_initialization=on_cpu,
        perform_initialization=initialize,
        # The interleaved schedule cannot be told the doubled activation width: shapes travel.
        variable_seq_lengths=vpp is not None,
        batch_p2p_comm=not (on_cpu and vpp is not None),  # see megatron_gift.platform.cpu
        cross_entropy_loss_fusion=False,  # the loss is GIFT's own
        # Megatron-LM's two memory savings, off in TransformerConfig: SwiGLU as one autograd
        # function that keeps fc1's output alone (3 [s, b, ffn/tp] tensors a layer instead of
        # 5; torch.compile'd, which on a CPU means a C++ compiler: CUDA alone, as
        # bias_dropout_fusion), and each sent pipeline output freed once sent (plain PyTorch).
        bias_activation_fusion=not on_cpu, deallocate_pipeline_outputs=True,
        **kernels.fusions(), **fp8_fields(config.precision, frozen), **moe_fields(config, frozen),
    )


def moe_fields(config: DictConfig, frozen: bool = False) -> dict:
    """``TransformerConfig``'s mixture-of-experts fields (none for a dense model).

    Qwen3-MoE's router takes the softmax over the experts' logits, the top k, and with
    ``norm_topk_prob`` renormalises those k probabilities: Megatron-Core's softmax router with
    the softmax after the top-k (``moe_router_pre_softmax`` off) computes exactly that (the
    softmax of the k chosen logits); with it on, the unnormalised top-k probabilities. Dropless
    routing (no capacity factor), experts one after the other (no grouped GEMM). The token
    dispatcher is ``alltoall`` on CUDA and ``allgather`` on CPU: the all-to-all dispatcher makes
    CUDA streams when it is built; the all-gather one needs only all-gather and reduce-scatter,
    which gloo has. The frozen reference adds no load-balancing loss.
    """
    model, training = config.model, config.training
    if not model.num_moe_experts:
        return {"moe_token_dispatcher_type": "alltoall"}  # unused; allgather refuses VPP's shapes
    fields = {
        "num_moe_experts": model.num_moe_experts, "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
        "moe_layer_freq": moe_layer_freq(model.moe_layer_freq),
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not model.moe_norm_topk_prob,
        "moe_token_dispatcher_type": "alltoall" if torch.cuda.is_available() else "allgather",
        "moe_aux_loss_coeff": 0.0 if frozen else training.moe_aux_loss_coeff,
        "moe_router_load_balancing_type": ("none" if frozen
                                           else training.moe_router_load_balancing_type),
        "expert_model_parallel_size": config.parallel.expert_model_parallel_size,
    }
    if config.parallel.expert_tensor_parallel_size is not None:
        fields["expert_tensor_parallel_size"] = config.parallel.expert_tensor_parallel_size
    return fields


def fp8_fields(precision: DictConfig, frozen: bool = False) -> dict:
    """``TransformerConfig``'s FP8 fields for the student, or with ``frozen`` for the reference.

    Megatron-Core's ``get_fp8_context`` reads them: the transformer block runs under TE's
    ``fp8_autocast`` with the recipe they name (the embedding, the output layer and the loss
    are not TE modules and stay bf16/fp32), and ``fp8_param`` builds the GEMM weights in FP8
    under TE's ``fp8_model_init``. The reference in FP8 takes the student's recipe in a config
    of its own; its FP8 weights are ``--reference-fp8-weights`` (the student's
    ``--fp8-param-gather``). A reference in bf16, or a run without FP8, gets ``fp8=None``.
    """
    if precision.fp8_format is None or (frozen and precision.reference_precision != "fp8"):
        return {"fp8": None}
    return {
        "fp8": precision.fp8_format, "fp8_recipe": precision.fp8_recipe,
        "fp8_margin": precision.fp8_margin,
        "fp8_amax_history_len": precision.fp8_amax_history_len,
        "fp8_amax_compute_algo": precision.fp8_amax_compute_algo,
        "first_last_layers_bf16": precision.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": precision.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": precision.num_layers_at_end_in_bf16,
        "fp8_param": (precision.reference_fp8_weights if frozen
                      else precision.fp8_param_gather),
    }


def padded_vocab_size(vocab_size: int, config: DictConfig) -> int:
    """The vocab padded to a multiple of ``make_vocab_size_divisible_by`` that TP divides
    (:func:`megatron_gift.core.vocab.padded_vocab_size`)."""
    return vocab.padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by,
                                   config.parallel.tensor_model_parallel_size)


def build_chunks(config: DictConfig, tf_config: TransformerConfig, vocab_size: int,
                 device: torch.device, local_spec: bool = False) -> list[GPTModel]:
    """This rank's ``GPTModel`` chunks (one per virtual pipeline stage), on ``device``.

    Every parameter takes ``params_dtype`` (norms included, as Megatron-LM's Float16Module
    does), so a bf16 model has no stray fp32 parameters. Layers are Transformer Engine's when
    it is installed, unless ``local_spec``; checkpoints of either load into the other.
    """
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    adapters = lora.settings(config)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        spec = (_local_spec(tf_config, stage) if local_spec or adapters
                else _layer_spec(tf_config, stage))
        if adapters:
            spec = _with_adapters(spec, tf_config, stage, adapters)
        chunks.append(GPTModel(
            config=tf_config, transformer_layer_spec=spec, vocab_size=vocab_size,
            max_sequence_length=config.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not config.model.untie_embeddings_and_output_weights,
            position_embedding_type="rope", rotary_base=config.model.rotary_base,
            rope_scaling=bool(config.model.rope_scaling_factor),
            rope_scaling_factor=config.model.rope_scaling_factor or 8.0, vp_stage=stage,
        ).to(device=device, dtype=tf_config.params_dtype))
    return chunks


def freeze(model: _Module) -> _Module:
    """Eval mode, no grads: the reference never changes."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class HeadInputs(NamedTuple):
    """What a model's output layer would take on the last stage: the final hidden states
    ``[s, b, h]`` (after the final norm; with sequence parallelism gathered over the TP group,
    as the output layer gathers them) and the output weight ``[V/tp, h]`` (the embedding's where
    they are tied). ``gathered``: the hidden states came through Megatron's
    ``gather_from_sequence_parallel_region``, whose backward reduce-scatters their gradient,
    so the head must leave its gradient unreduced over TP."""

    hidden: torch.Tensor
    weight: torch.Tensor
    gathered: bool = False


def _head_inputs(hidden_states, output_layer, output_weight, **_) -> HeadInputs:
    """Megatron-Core's ``GPTModel.forward(output_processor=...)`` hook: the output layer's
    inputs instead of its logits."""
    weight = output_weight if output_weight is not None else output_layer.weight
    if not output_layer.sequence_parallel:
        return HeadInputs(hidden_states, weight)
    return HeadInputs(tensor_parallel.gather_from_sequence_parallel_region(
        hidden_states, tensor_parallel_output_grad=True), weight, gathered=True)


class GiftModel(torch.nn.Module):
    """One pipeline chunk of the student (usually DDP-wrapped) beside its frozen reference.

    ``forward`` returns, on the last stage, ``(student_logits, reference_logits)`` each
    ``[b, s, V/tp]`` (reference ``None`` without one); elsewhere the hidden states to send,
    ``[s, b, h]`` or, with a reference, ``[s, b, 2h]`` (student first).
    """

    def __init__(self, student, reference=None, reference_is_base: bool = False):
        super().__init__()
        self.student = student
        self.reference = freeze(reference) if reference is not None else None
        # LoRA: the reference is the student's own modules with the adapters off.
        self.reference_is_base = reference_is_base and reference is None
        self._base_input: Optional[torch.Tensor] = None
        self.use_reference = True
        self.head = "logits"  # "fused": the last stage returns HeadInputs instead of logits
        inner = unwrap(student)
        self.config, self.model_type = inner.config, inner.model_type
        self.pre_process, self.post_process = inner.pre_process, inner.post_process
        self.hidden_size = inner.config.hidden_size
        self.device = next(inner.parameters()).device

    def set_input_tensor(
        self, input_tensor: Union[Optional[torch.Tensor], Sequence[Optional[torch.Tensor]]],
    ) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        inner = unwrap(self.student)
        self._base_input = None
        if not self.runs_reference or tensor is None:
            inner.set_input_tensor(tensor)
            if self.reference is not None:
                self.reference.set_input_tensor(None)
            return
        # Halves of the last dim are strided views: give each model a contiguous tensor
        # (fused kernels, Transformer Engine's among them, may assume one).
        student_part, reference_part = (part.contiguous()
                                        for part in tensor.split(self.hidden_size, dim=-1))
        inner.set_input_tensor(student_part)
        if self.reference is not None:
            self.reference.set_input_tensor(reference_part)
        else:
            self._base_input = reference_part

    def set_is_first_microbatch(self) -> None:
        """Megatron's schedules call this on a model chunk before the first micro-batch of a
        step; Transformer Engine's FP8 layers then quantize their weights afresh instead of
        reusing the cache of the step before (without it an FP8 student would train on the
        FP8 weights of its first step). Passed on to both models; a no-op without FP8."""
        unwrap(self.student).set_is_first_microbatch()
        if self.reference is not None:
            self.reference.set_is_first_microbatch()

    @property
    def runs_reference(self) -> bool:
        """Whether forward runs the reference: it exists and is not switched off by
        ``use_reference = False`` (evaluation reads the student alone)."""
        return (self.reference is not None or self.reference_is_base) and self.use_reference

    def forward(
        self, tokens: torch.Tensor, position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor], packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``tokens`` and ``position_ids``: int64 ``[b, s]``; ``attention_mask``: bool
        ``[b, 1, s, s]``, True where blocked, or None with ``packed_seq_params`` (packed
        sequences in Transformer Engine's "thd" format, ``b = 1``). Returns what the class doc
        says.

        Each model runs under the FP8 context of its own ``TransformerConfig`` (Megatron-Core's
        transformer block enters it), so an FP8 reference keeps a scaling state of its own: with
        delayed scaling, TE keeps the amax history in each module's FP8 metadata, and the
        reference's modules are distinct from the student's, so only the reference's own
        forwards build it.
        """
        extra = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
        if self.post_process and self.head == "fused":
            extra["output_processor"] = _head_inputs
        reference_out = None
        if self.runs_reference:
            with torch.no_grad():
                if self.reference is not None:
                    reference_out = self.reference(tokens, position_ids, attention_mask, **extra)
                else:
                    reference_out = self._base_forward(tokens, position_ids, attention_mask,
                                                       extra)
        student_out = self.student(tokens, position_ids, attention_mask, **extra)
        if self.post_process:
            return student_out, reference_out
        if reference_out is None:
            return student_out
        return torch.cat([student_out, reference_out], dim=-1)


    def _base_forward(self, tokens, position_ids, attention_mask, extra: dict):
        """The student's own modules with their LoRA adapters off (the reference of LoRA GIFT),
        on the reference's half of the received hidden states; the student's input is put
        back for its own pass."""
        inner = unwrap(self.student)
        student_input = inner.decoder.input_tensor
        inner.set_input_tensor(self._base_input)
        try:
            with lora.adapters_disabled(inner):
                return inner(tokens, position_ids, attention_mask, **extra)
        finally:
            inner.set_input_tensor(student_input)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP-style wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


class SequenceParallelRMSNorm:
    """PyTorch's RMSNorm for the local layer spec, with sequence parallelism allowed.

    Megatron-Core's ``WrappedTorchNorm`` (transformer/torch_norm.py), the local spec's norm
    where Apex is missing, refuses ``sequence_parallel``: it does not mark its weight, so the
    weight's gradient (each TP rank sees only its share of the sequence) would not be summed
    over TP. This norm marks it (``weight.sequence_parallel``), which
    ``finalize_model_grads`` reads to all-reduce it, as Apex's ``FusedLayerNorm`` does.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **unused) -> torch.nn.RMSNorm:
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def _with_adapters(spec, config: TransformerConfig, vp_stage: Optional[int],
                   adapters: lora.LoraSettings) -> TransformerBlockSubmodules:
    """The block spec of this stage with LoRA adapters on its target linears (local layers:
    Transformer Engine's layer-norm-fused linear does not hand the normalised input on)."""
    if isinstance(spec, TransformerBlockSubmodules):
        layer_specs, final_norm = spec.layer_specs, spec.layer_norm
    else:
        layer_specs = [spec] * get_num_layers_to_build(config, vp_stage=vp_stage)
        final_norm = SequenceParallelRMSNorm  # torch's RMSNorm, as the local spec's
    first = get_transformer_layer_offset(config, vp_stage=vp_stage) + 1
    return TransformerBlockSubmodules(layer_specs=lora.with_adapters(layer_specs, adapters, first),
                                      layer_norm=final_norm)


def _layer_spec(config: TransformerConfig, vp_stage: Optional[int]):
    if not te.available():
        return _local_spec(config, vp_stage)
    if config.num_moe_experts:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


def _local_spec(config: Optional[TransformerConfig] = None, vp_stage: Optional[int] = None):
    """Megatron-Core's local layer spec (RMSNorm); for a mixture-of-experts model the block's
    layer specs (MoE and dense layers as ``moe_layer_freq`` says); with sequence parallelism,
    every norm, the final one included, is :class:`SequenceParallelRMSNorm`."""
    if config is not None and config.num_moe_experts:
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                           normalization="RMSNorm", vp_stage=vp_stage)
        layer_specs = block.layer_specs
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm",
                                        qk_layernorm=config is not None and config.qk_layernorm)
        if config is None or not config.sequence_parallel:
            return spec
        layer_specs = [spec] * get_num_layers_to_build(config, vp_stage=vp_stage)
    if not config.sequence_parallel:
        return block
    for spec in layer_specs:
        spec.submodules.input_layernorm = SequenceParallelRMSNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
        attention = spec.submodules.self_attention.submodules
        if config.qk_layernorm:  # Qwen3's per-head norms (their gradients are summed over TP)
            attention.q_layernorm = attention.k_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=SequenceParallelRMSNorm)
