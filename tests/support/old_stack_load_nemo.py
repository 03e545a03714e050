"""Run by the old stack's Python (tests/old_stack.py: torch 2.4, Megatron-Core 0.10), not by
this project's: load a NeMo-Aligner export the way NeMo 2.1 restores a ``.nemo`` directory and
save what came out for the test to compare.

    python old_stack_load_nemo.py MODEL_DIR TOKENS_JSON OUT_PT

* ``MODEL_DIR/model_config.yaml`` -> Megatron-Core 0.10 ``TransformerConfig`` + ``GPTModel``
  with the mapping of NeMo's ``MegatronBaseModel.build_transformer_config`` and
  ``MegatronGPTModel.model_provider_func`` (``bias`` -> add_bias_linear, ``qkv_bias`` ->
  add_qkv_bias, ``activation: fast-swiglu`` -> gated silu, ``normalization: rmsnorm`` ->
  RMSNorm, ``override_vocab_size`` -> vocab, ``scale_positional_embedding`` -> Llama-3.1 RoPE
  scaling, ...). Differences for a CPU without Apex/TE: the local layer spec (torch RMSNorm)
  instead of TE's, the fusions off, fp32 or the export's dtype instead of bf16 O2.
* ``MODEL_DIR/model_weights`` -> ``dist_checkpointing.load`` of
  ``{"state_dict": model.sharded_state_dict(prefix="model.")}`` with
  ``StrictHandling.ASSUME_OK_UNEXPECTED`` (NeMo's ``DistributedCheckpointIO.load_checkpoint``
  default), plus one ``_extra_state`` object per TE module and layer as the TE layer spec asks
  for them; then ``load_state_dict(strict=True)`` without the ``model.`` prefix, as
  ``MegatronGPTModel.on_load_checkpoint`` does.
* Logits of the tokens (one sequence, explicit causal mask).

OUT_PT gets ``{"versions", "state" (the model's tensors by local name), "logits" [1, s, V],
"extra_states" {key: [value per layer]}}``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import yaml

# Megatron-Core 0.10 on a CPU-only process, one rank. What each stub covers (megatron/core):
# * torch.cuda.current_device -> "cpu": utils.py :: GlobalMemoryBuffer.get_tensor,
#   models/common/embeddings/rotary_pos_embedding.py :: RotaryEmbedding.forward.
# * torch.cuda.manual_seed / get_rng_state / set_rng_state -> the CPU generator:
#   tensor_parallel/random.py :: model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add/.fork
#   (forked by transformer/dot_product_attention.py :: DotProductAttention.forward).
torch.cuda.current_device = lambda: "cpu"
torch.cuda.manual_seed = lambda seed: None
torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
torch.cuda.set_rng_state = lambda state, device=None: None
import megatron.core.tensor_parallel.random as mcore_random  # noqa: E402

mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: None

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.validation import StrictHandling  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint  # noqa: E402

TE_EXTRA_STATES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                   "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2")


def build(cfg, dtype):
    assert cfg["mcore_gpt"] and cfg["activation"] == "fast-swiglu"
    assert cfg["normalization"] == "rmsnorm" and cfg["position_embedding_type"] == "rope"
    config = TransformerConfig(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"], kv_channels=cfg["kv_channels"],
        init_method_std=cfg["init_method_std"], layernorm_epsilon=cfg["layernorm_epsilon"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=cfg["bias"], add_qkv_bias=cfg["qkv_bias"],
        hidden_dropout=cfg["hidden_dropout"], attention_dropout=cfg["attention_dropout"],
        apply_query_key_layer_scaling=cfg["apply_query_key_layer_scaling"],
        params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=cfg["override_vocab_size"], max_sequence_length=cfg["encoder_seq_length"],
        pre_process=True, post_process=True, parallel_output=True,
        share_embeddings_and_output_weights=cfg["share_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=cfg["rotary_percentage"],
        seq_len_interpolation_factor=cfg["seq_len_interpolation_factor"],
        rotary_base=cfg["rotary_base"], rope_scaling=cfg["scale_positional_embedding"])


def main(model_dir, tokens_path, out_path):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%s" % os.environ["PORT"],
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with open(os.path.join(model_dir, "model_config.yaml")) as f:
        cfg = yaml.safe_load(f)
    with open(tokens_path) as f:
        request = json.load(f)
    dtype = getattr(torch, request["dtype"])
    model = build(cfg, dtype)
    layers = cfg["num_layers"]
    model_requests = model.sharded_state_dict(prefix="model.")
    asked = {value.key for value in model_requests.values()}
    # The local spec of 0.10 asks for some of them itself (linear_proj); TE's for all.
    te_requests = {
        f"{module}.{i}": make_sharded_object_for_checkpoint(
            None, f"model.decoder.layers.{module}._extra_state", ((0, i, layers),))
        for module in TE_EXTRA_STATES for i in range(layers)
        if f"model.decoder.layers.{module}._extra_state" not in asked}
    request_state = {"state_dict": model_requests, "te_extra_states": te_requests}
    loaded = dist_checkpointing.load(request_state, os.path.join(model_dir, "model_weights"),
                                     strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    state = {k[len("model."):]: v for k, v in loaded["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    tokens = torch.tensor([request["tokens"]])
    seq = tokens.size(1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    with torch.no_grad():
        logits = model(tokens, torch.arange(seq).unsqueeze(0), mask)
    extra = {}
    for name, value in loaded["te_extra_states"].items():
        module, i = name.rsplit(".", 1)
        extra.setdefault(module, [None] * layers)[int(i)] = repr(value)
    for name, value in loaded["state_dict"].items():
        if name.endswith("._extra_state"):
            extra.setdefault(name, repr(value))
    import megatron.core

    torch.save({"versions": {"torch": torch.__version__, "megatron.core": megatron.core.__version__,
                             "python": sys.version.split()[0]},
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()
                          if isinstance(v, torch.Tensor)},
                "logits": logits.float(), "extra_states": extra}, out_path)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
