"""Fusions are on exactly where their kernels are installed and CUDA runs them."""

import pytest

from megatron_gift.platform import kernels


def test_without_cuda_every_fusion_is_off():
    assert kernels.fusions(cuda=False) == dict.fromkeys(kernels.FUSIONS, False)
    assert kernels.describe(kernels.fusions(cuda=False)) == "no fused kernels"


@pytest.mark.parametrize("present,on", [
    ((), {"bias_dropout_fusion"}),
    (("fused_weight_gradient_mlp_cuda", "apex.contrib.layer_norm"),
     {"bias_dropout_fusion", "gradient_accumulation_fusion", "persist_layer_norm"}),
    (("scaled_masked_softmax_cuda",), {"bias_dropout_fusion"}),  # needs both softmax kernels
    (("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
     {"bias_dropout_fusion", "masked_softmax_fusion"}),
])
def test_on_cuda_a_fusion_is_on_where_its_kernel_is_installed(monkeypatch, present, on):
    monkeypatch.setattr(kernels, "installed", lambda module: module in present)
    assert {name for name, value in kernels.fusions(cuda=True).items() if value} == on


def test_the_model_config_takes_the_fusions_of_the_machine(monkeypatch):
    """``transformer_config`` passes each fusion on as ``kernels.fusions`` says (a stand-in
    here: the fused kernels cannot run on a CPU)."""
    from megatron_gift.config import parse_config
    from megatron_gift.core import model

    config = parse_config(["--vocab-size", "64", "--kv-channels", "8"], defaults={
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 64, "seq_length": 16}})
    chosen = {"gradient_accumulation_fusion": False, "apply_rope_fusion": False,
              "masked_softmax_fusion": True, "persist_layer_norm": True,
              "bias_dropout_fusion": True}
    monkeypatch.setattr(kernels, "fusions", lambda: dict(chosen))
    import torch

    tf_config = model.transformer_config(config, torch.float32)
    assert {name: getattr(tf_config, name) for name in chosen} == chosen
    assert tf_config.perform_initialization
    assert not model.transformer_config(config, torch.float32,
                                        initialize=False).perform_initialization
