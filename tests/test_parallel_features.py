"""Sequence, context parallelism and recompute: nonsense combinations are refused up front,
naming the flags; CP needs Transformer Engine on CUDA; each CP rank keeps Megatron's zigzag
share of a micro-batch. (The numbers of SP, recompute and the overlapped reduce against one
process: tests/test_training.py.)"""

import os

import pytest
import torch

from megatron_gift.config import check_layer_split, parse_config
from support.parallel_harness import run_distributed


@pytest.mark.parametrize("argv,message", [
    (["--sequence-parallel"], r"parallel.sequence_parallel \(--sequence-parallel\) needs "
                              r"parallel.tensor_model_parallel_size"),
    (["--recompute-num-layers", "2"], r"training.recompute_method \(--recompute-method\) and "
                                      r"training.recompute_num_layers .* apply to .*=full only"),
    (["--recompute-method", "block"], r"apply to training.recompute_granularity"),
    (["--recompute-granularity", "full"], r"=full needs training.recompute_method"),
    (["--recompute-granularity", "sometimes"], r"must be one of full, selective"),
    (["--overlap-param-gather"], r"needs parallel.use_distributed_optimizer"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"],
     r"seq_length=33 is not divisible by tensor parallel size 2"),
    (["--context-parallel-size", "2", "--seq-length", "30"],
     r"seq_length=30 is not divisible by 2 x context parallel size = 4"),
    (["--context-parallel-size", "0"], r"context_parallel_size \(--context-parallel-size\) must "
                                       r"be positive"),
])
def test_nonsense_combinations_are_refused_naming_the_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_a_layer_split_that_does_not_divide_is_refused_once_the_model_is_known():
    config = parse_config(["--num-layers", "6", "--pipeline-model-parallel-size", "2",
                           "--virtual-pipeline-model-parallel-size", "2"])
    with pytest.raises(ValueError, match=r"num_layers=6 is not divisible by pipeline x virtual "
                                         r"pipeline stages = 4"):
        check_layer_split(config)
    check_layer_split(parse_config(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                                    "--virtual-pipeline-model-parallel-size", "2"]))


def test_context_parallelism_without_transformer_engine_on_cuda_is_refused(tmp_path):
    from megatron_gift.engine.trainer import train

    config = parse_config(["--context-parallel-size", "2", "--save", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"context_parallel_size=2 needs Transformer Engine's "
                                         r"attention on CUDA"):
        train(config)
    assert not (tmp_path / "run").exists()


def _share_on_this_rank(seq, path):
    import json

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gift.engine.pipeline import context_parallel_share

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    positions = torch.arange(seq).repeat(2, 1)
    batch = {"tokens": positions * 10, "labels": positions * 10 + 1, "loss_mask":
             (positions % 3 == 0).float(), "position_ids": positions}
    share = {k: v.tolist() for k, v in context_parallel_share(batch).items()}
    gathered = [None, None]
    dist.all_gather_object(gathered, share)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(gathered, f)


@pytest.mark.distributed
def test_each_context_parallel_rank_keeps_its_zigzag_share(tmp_path):
    """CP=2, 8 tokens: chunks of 2, rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2; labels
    and loss mask go with their tokens."""
    import json

    run_distributed(2, _share_on_this_rank, 8, str(tmp_path / "shares.json"))
    shares = json.loads((tmp_path / "shares.json").read_text())
    for rank, kept in enumerate(([0, 1, 6, 7], [2, 3, 4, 5])):
        assert shares[rank]["position_ids"] == [kept, kept]
        assert shares[rank]["tokens"] == [[10 * p for p in kept]] * 2
        assert shares[rank]["labels"] == [[10 * p + 1 for p in kept]] * 2
        assert shares[rank]["loss_mask"] == [[float(p % 3 == 0) for p in kept]] * 2


def _rng_round_trip_at_cp2(directory):
    import json

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_gift.core import checkpoint

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    torch.manual_seed(100 + dist.get_rank())  # the CP ranks' states differ; one is saved
    dist_checkpointing.save({"rng_state": checkpoint._rng_object()}, directory)
    first = torch.rand(3).tolist()  # what rank 0 draws next from the saved state
    torch.manual_seed(7)
    loaded = dist_checkpointing.load({"rng_state": checkpoint._rng_object()}, directory)
    checkpoint._restore_rng(loaded["rng_state"].data if hasattr(loaded["rng_state"], "data")
                            else loaded["rng_state"])
    draws = [None, None]
    dist.all_gather_object(draws, {"first": first, "restored": torch.rand(3).tolist(),
                                   "layout": checkpoint.layout()})
    if dist.get_rank() == 0:
        with open(directory + ".json", "w") as f:
            json.dump(draws, f)


@pytest.mark.distributed
def test_a_context_parallel_save_keeps_one_rng_state_per_model_parallel_rank(tmp_path):
    """At CP=2 the two CP ranks share (PP, TP) rank 0: their RNG states are replicas (a save
    that keyed them by DP rank alone failed with duplicate keys); both resume from rank 0's,
    and the layout records CP."""
    import json

    run_distributed(2, _rng_round_trip_at_cp2, str(tmp_path / "ckpt"))
    draws = json.loads((tmp_path / "ckpt.json").read_text())
    assert draws[0]["first"] != draws[1]["first"]
    assert draws[0]["restored"] == draws[1]["restored"] == draws[0]["first"]
    assert draws[0]["layout"] == [1, 1, 1, 2]


# ---------------------------------------------------------------------------------------------
# Megatron-LM's memory savings: the fused SwiGLU (with CUDA) and pipeline outputs freed once sent


@pytest.mark.parametrize("cuda", [False, True])
def test_the_fused_swiglu_runs_with_cuda_and_sent_outputs_are_freed_everywhere(monkeypatch, cuda):
    """``bias_activation_fusion`` (torch.compile'd: a C++ compiler on a CPU) with CUDA alone;
    ``deallocate_pipeline_outputs`` (plain PyTorch) on both."""
    from megatron_gift.core import model as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for frozen in (False, True):
        tf_config = models.transformer_config(parse_config(["--bf16"]), torch.bfloat16,
                                              frozen=frozen)
        assert tf_config.bias_activation_fusion is cuda
        assert tf_config.deallocate_pipeline_outputs is True


def _grad_fn_names(tensor) -> set:
    """Type names of the autograd nodes ``tensor`` was computed through."""
    seen, todo = {}, [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo += [next_node for next_node, _ in node.next_functions]
    return set(seen.values())


def test_the_fused_swiglu_computes_what_the_unfused_one_does(world_of_one):
    """The engine's student (local layers, fp32) with Megatron-Core's fused SwiGLU autograd
    function, run eagerly, against the unfused SwiGLU on the same weights: same logits and
    gradients."""
    from megatron.core import tensor_parallel

    from megatron_gift.core import model as models
    from megatron_gift.platform.cpu import enable_cpu_megatron
    from support.parallel_harness import causal_mask

    enable_cpu_megatron()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    config = parse_config(["--vocab-size", "64", "--seq-length", "16"])
    tf_config = models.transformer_config(config, torch.float32)
    [model] = models.build_chunks(config, tf_config, 128, torch.device("cpu"), local_spec=True)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).repeat(2, 1)
    found = {}
    for fused in (False, True):
        tf_config.bias_activation_fusion = fused  # read by MLP.forward
        model.zero_grad(set_to_none=True)
        with torch.compiler.set_stance("force_eager"):
            logits = model(tokens, positions, causal_mask(2, 16))
            assert ("SwiGLUFunctionBackward" in _grad_fn_names(logits)) is fused
            logits.square().mean().backward()
        found[fused] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(found[True][0], found[False][0], rtol=1e-6, atol=1e-6)
    for name, grad in found[False][1].items():
        torch.testing.assert_close(found[True][1][name], grad, rtol=1e-5, atol=1e-7)
