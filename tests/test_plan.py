"""The memory planner (``megatron_gift.planning``, ``megatron-gift plan``).

Validated four ways: its static parts equal what the engine's Megatron-Core models allocate
(parameters of every rank at TP2 x PP2, the DDP grad buffer and Adam's state; for Qwen3-MoE
also with EP and an expert TP of its own, and the distributed optimizer's grouping of the
experts); its activations are within 15% of what autograd keeps during the engine's own
schedule at TP, SP, selective and full recompute, PP with 1F1B and interleaving, SwiGLU fused
and not (Qwen3-MoE's within 1%, at EP 1 and 2); its student part is
within 5% of Megatron-LM's theoretical formula (re-implemented here as an oracle) where both
model the same thing; the fused GIFT head's terms are within 10% of what its forward and
backward allocate (fp32, bf16, its GPU path). Plus what FP8 changes (Transformer Engine's FP8
copies, transposes, scaling state and FP8 saved inputs, derived from its source), the command,
its errors and the suggestions, every shipped recipe fits, and its launch line gives a
stopping run the time to save. LoRA GIFT likewise: static parts to the byte against the
engine's LoRA models (the adapters alone trained, no reference), activations to 1% against
autograd, the local attention's workspace and the fused head with a frozen output weight
against what they allocate.
"""

import builtins
import dataclasses
import glob
import itertools
import json
import math
import os
import re

import pytest

from megatron_gift.config import parse_config
from megatron_gift.planning import memory
from megatron_gift.loss.objectives import GiftLoss
from megatron_gift.commands.plan import DOES_NOT_FIT_EXIT
from megatron_gift.commands.plan import main as plan_main
from support.parallel_harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "examples", "recipes")
GIB = 1 << 30

# Bridge's H100 SFT layout of Llama-3.1-70B (TP8 PP4, 32 GPUs, seq 4096, no distributed
# optimizer), here with GIFT's reference.
LLAMA_70B = ["--num-layers", "80", "--hidden-size", "8192", "--num-attention-heads", "64",
             "--num-query-groups", "8", "--kv-channels", "128", "--ffn-hidden-size", "28672",
             "--vocab-size", "128256", "--seq-length", "4096", "--bf16",
             "--micro-batch-size", "1", "--global-batch-size", "8",
             "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4"]
# The recipes' 8192 tokens on that layout: does not fit without sequence parallelism.
LLAMA_70B_8K = [*LLAMA_70B, "--seq-length", "8192"]
QWEN_7B = ["--num-layers", "28", "--hidden-size", "3584", "--num-attention-heads", "28",
           "--num-query-groups", "4", "--kv-channels", "128", "--ffn-hidden-size", "18944",
           "--vocab-size", "152064", "--add-qkv-bias", "--seq-length", "4096", "--bf16",
           "--micro-batch-size", "1", "--global-batch-size", "128",
           "--tensor-model-parallel-size", "2"]


def _run(argv, num_gpus=None, **kw):
    return memory.run_from_config(parse_config(argv), num_gpus, **kw)


def _command(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``python -m megatron_gift.plan ARGV``, in process."""
    try:
        plan_main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# The command


def test_json_holds_the_layout_the_parameters_and_every_part_of_every_stage(capsys):
    code, out, _ = _command(capsys, *LLAMA_70B, "--num-gpus", "64", "--sequence-parallel",
                            "--use-distributed-optimizer", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["layout"] == {
        "tensor_model_parallel_size": 8, "pipeline_model_parallel_size": 4,
        "virtual_pipeline_model_parallel_size": None, "context_parallel_size": 1,
        "data_parallel_size": 2, "micro_batch_size": 1, "global_batch_size": 8,
        "seq_length": 4096, "num_gpus": 64, "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": None}
    assert 70.5e9 < plan["parameters"]["student_total"] < 70.6e9  # Llama-3.1-70B: 70.55 B
    assert plan["parameters"]["student_active"] == plan["parameters"]["student_total"]
    assert sorted(s["pipeline_rank"] for s in plan["stages"]) == [0, 1, 2, 3]
    assert plan["stages"][0]["pipeline_rank"] == 0  # worst first: the most in flight
    totals = [s["bytes"]["total"] for s in plan["stages"]]
    assert totals == sorted(totals, reverse=True)
    for stage in plan["stages"]:
        parts = stage["bytes"]
        assert set(parts) == set(memory.PARTS) | {"total"}
        assert parts["total"] == sum(parts[p] for p in memory.PARTS)
        assert isinstance(stage["parameters_per_gpu"], int)
        assert parts["reference_weights"] == parts["student_weights"]
    by_rank = {s["pipeline_rank"]: s["bytes"] for s in plan["stages"]}
    assert by_rank[3]["loss_buffers"] > 0  # the last stage
    assert by_rank[0]["loss_buffers"] == by_rank[0]["fp8_state"] == 0
    assert plan["gpu_memory_bytes"] == 80 * GIB
    assert plan["fits"] is True and plan["suggestion"] is None
    assert plan["stop"]["save_bytes"] == 14 * plan["parameters"]["student_total"]
    assert plan["stop"]["shutdown_timeout"] == 600  # the 70B floor


def test_text_shows_each_stage_and_says_what_would_fit(capsys):
    code, out, _ = _command(capsys, *LLAMA_70B_8K, "--num-gpus", "32")
    assert code == DOES_NOT_FIT_EXIT == 1  # the table all the same, and a status scripts can test
    assert re.search(r"GiB per GPU\s+stage 0\s+stage 1\s+stage 2\s+stage 3", out)
    for label in ("student weights", "gradients", "optimizer", "reference weights",
                  "activations", "pipeline buffers", "loss buffers", "FP8 state", "total"):
        assert re.search(rf"^{label}\s+[\d.]+", out, re.M), label
    assert "does not fit: stage 0 needs" in out
    assert "suggestion: --sequence-parallel (then" in out
    assert re.search(r"^stopping: a step \(~\d+ s\) and a save of 920 GiB \(~\d+ s\), "
                     r"estimated: torchrun --shutdown-timeout 600, sbatch --signal=B:TERM@600$",
                     out, re.M)


def test_a_plan_that_does_not_fit_exits_1_after_its_json_and_help_says_so(capsys):
    code, out, err = _command(capsys, *LLAMA_70B_8K, "--num-gpus", "32", "--json")
    assert code == 1 and err == ""
    assert json.loads(out)["fits"] is False
    code, out, _ = _command(capsys, "--help")
    assert code == 0
    assert re.search(r"Exit status: 0 when the plan fits; 1 when it does not .*2 on a bad\s+input",
                     " ".join(out.split()))


@pytest.mark.parametrize("argv,message", [
    (["--num-layers", "2", "--seq-length", "16"],
     r"model.vocab_size \(--vocab-size\) is not set: the planner reads no model files"),
    ([*LLAMA_70B, "--num-gpus", "48"],
     r"--num-gpus 48 is not a positive multiple of tensor x pipeline x context parallel size "
     r"= 8 x 4 x 1"),
    ([*LLAMA_70B, "--pipeline-model-parallel-size", "3"],
     r"model.num_layers=80 is not divisible by pipeline x virtual pipeline stages = 3"),
    ([*LLAMA_70B, "--num-gpus", "64", "--micro-batch-size", "3"],
     r"training.global_batch_size=8 is not a multiple of micro_batch_size x data-parallel "
     r"size = 3 x 2 \(--global-batch-size, --micro-batch-size, --num-gpus\)"),
    ([*LLAMA_70B, "--gpu-memory-gib", "0"],
     r"--gpu-memory-gib must be a positive finite number of GiB, got 0.0 \(e.g. "),
    ([*LLAMA_70B, "--gpu-memory-gib", "-80"], r"--gpu-memory-gib must be .*, got -80.0"),
    ([*LLAMA_70B, "--gpu-memory-gib", "nan"], r"--gpu-memory-gib must be .*, got nan"),
    ([*LLAMA_70B, "--gpu-memory-gib", "inf"], r"--gpu-memory-gib must be .*, got inf"),
    ([*LLAMA_70B, "--sequence-parallel", "--tensor-model-parallel-size", "1"],
     r"parallel.sequence_parallel \(--sequence-parallel\) needs"),
    (["--config", os.path.join(RECIPES, "qwen3-30b-a3b-gift.yaml"), "--num-gpus", "12"],
     r"--num-gpus 12 is not a multiple of expert tensor x expert x pipeline parallel size = "
     r"1 x 8 x 1 \(Megatron-Core lays the experts out inside data parallelism; "),
    (["--config", os.path.join(RECIPES, "qwen3-30b-a3b-gift.yaml"),
      "--expert-model-parallel-size", "3"],
     r"model.num_moe_experts \(--num-moe-experts\)=128 is not divisible by "),
    ([*LLAMA_70B, "--pipeline-model-parallel-size", "3", "--num-gpus", "50"],
     r"^error: 2 problems: \(1\) model.num_layers=80 is not divisible by pipeline x virtual "
     r"pipeline stages = 3 .*; \(2\) --num-gpus 50 is not a positive multiple of tensor x "
     r"pipeline x context parallel size = 8 x 3 x 1$"),
])
def test_bad_input_is_one_line_naming_the_value_and_flag(capsys, argv, message):
    code, out, err = _command(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_the_planner_reads_no_file(monkeypatch):
    """Placeholder model and data paths are never looked at: no file is opened or stat'ed."""
    config = parse_config(["--config", os.path.join(RECIPES, "llama3.1-70b-gift.yaml")])

    def refuse(*args, **kwargs):
        raise AssertionError(f"the planner touched the file system: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    for name in ("stat", "lstat", "listdir", "scandir"):
        monkeypatch.setattr(os, name, refuse)
    result = memory.plan(memory.run_from_config(config, 64))
    assert result.fits


# ---------------------------------------------------------------------------------------------
# Suggestions


def test_the_suggestion_is_the_cheapest_change_that_fits_checked_by_planning_it():
    run = _run(LLAMA_70B_8K, 32)
    result = memory.plan(run)
    assert not result.fits
    assert result.suggestion.startswith("--sequence-parallel (then ")
    assert result.suggested_run == dataclasses.replace(run, sequence_parallel=True)
    assert memory.plan(result.suggested_run).fits
    # Every cheaper layout does not fit.
    cost = memory.suggestion_cost(run, result.suggested_run)
    cheaper = [c for c in memory.layouts(run) if memory.suggestion_cost(run, c) < cost]
    assert cheaper
    for layout in cheaper:
        assert not memory.plan(layout, suggest=False).fits
    # Without TP there is no sequence parallelism to offer: the next rung is taken.
    tp1 = _run([*LLAMA_70B, "--tensor-model-parallel-size", "1", "--seq-length", "8192",
                "--pipeline-model-parallel-size", "8"], 64)
    tp1_plan = memory.plan(tp1)
    assert not tp1_plan.fits and not tp1_plan.suggestion.startswith("--sequence-parallel")
    suggested = tp1_plan.suggested_run
    assert suggested.tensor_parallel > 1 or not suggested.sequence_parallel


def _oracle_layouts(run, most_gpus):
    """Every TP (1, 2, 4, 8) x PP (dividing the layers) x DP (dividing the global batch) layout
    on at most ``most_gpus`` GPUs, with or without SP, the distributed optimizer and selective
    or full recompute: the planner's search space, enumerated here on its own."""
    recomputes = [(None, None, None), ("selective", None, None), ("full", "uniform", 1)]
    for tp, pp, dp in itertools.product((1, 2, 4, 8), range(1, run.num_layers + 1),
                                        range(1, run.global_batch_size + 1)):
        if (run.num_layers % pp or run.global_batch_size % (run.micro_batch_size * dp)
                or tp * pp * dp * run.context_parallel > most_gpus):
            continue
        for sp, distributed, (granularity, method, layers) in itertools.product(
                (False, True) if tp > 1 else (False,), (False, True), recomputes):
            yield dataclasses.replace(
                run, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp,
                sequence_parallel=sp, distributed_optimizer=distributed,
                recompute_granularity=granularity, recompute_method=method,
                recompute_num_layers=layers)


def test_the_suggestion_is_the_layout_that_fits_on_the_fewest_gpus():
    """Llama-3.1-70B at TP8 PP1 on 8 GPUs: TP8 PP4 DP2 fits on 64 GPUs, so a suggestion of more
    is not the cheapest; no layout on fewer GPUs than the suggestion's fits, and none on as many
    fits with less recompute, or as much and less model parallelism (TP x PP)."""
    config = parse_config(["--config", os.path.join(RECIPES, "llama3.1-70b-gift.yaml"),
                           "--pipeline-model-parallel-size", "1"])
    run = memory.run_from_config(config, 8)
    assert memory.plan(dataclasses.replace(run, pipeline_parallel=4, data_parallel=2)).fits
    result = memory.plan(run)
    assert not result.fits
    suggested = result.suggested_run
    assert suggested is not None and suggested.num_gpus <= 64
    assert memory.plan(suggested, suggest=False).fits
    assert f"--num-gpus {suggested.num_gpus} " in result.suggestion
    order = (None, "selective", "full")

    def rank(layout):
        return (order.index(layout.recompute_granularity),
                layout.tensor_parallel * layout.pipeline_parallel)

    layouts = list(_oracle_layouts(run, suggested.num_gpus))
    assert len(layouts) > 100
    for layout in layouts:
        if layout.num_gpus < suggested.num_gpus or rank(layout) < rank(suggested):
            assert not memory.plan(layout, suggest=False).fits, layout


def test_a_run_nothing_rescues_says_so():
    hopeless = _run([*LLAMA_70B, "--seq-length", "1048576"], 32)  # the logits alone: 64 GiB
    result = memory.plan(hopeless)
    assert not result.fits and result.suggested_run is None
    assert result.suggestion.startswith("no change tried fits; the least memory, ")


# ---------------------------------------------------------------------------------------------
# Static parts: exact against what Megatron-Core allocates (every rank)

TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8",
        "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "32",
        "--vocab-size", "300", "--micro-batch-size", "2"]
LAYOUT_2X2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
STATIC_CASES = {
    "untied, QKV bias": [*TINY, *LAYOUT_2X2, "--add-qkv-bias"],
    "tied": [*TINY, *LAYOUT_2X2, "--no-untie-embeddings-and-output-weights"],
    "interleaved": [*TINY, *LAYOUT_2X2, "--virtual-pipeline-model-parallel-size", "2"],
}


def _storage_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _count_on_rank(cases, out_dir):
    """Each case: student and reference parameters as the engine builds them in bf16, and in
    fp32 with the engine's DDP and optimizer after one step: grad buffer and Adam's state."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gift.engine import trainer

    found = {}
    for name, argv in cases.items():
        counts = {}
        for precision in ("bf16", "fp32"):
            config = parse_config([*argv, "--bf16" if precision == "bf16" else "--no-bf16"])
            trainer._init_parallel_state(config)
            _, _, students, references = trainer._build_models(config)
            references = references or []  # LoRA: none, the base is the reference
            params = [p for m in students for p in m.parameters()]
            counts[precision] = {
                "student_params": sum(p.numel() for p in params),
                "student_bytes": _storage_bytes(params),
                "trained_params": sum(p.numel() for p in params if p.requires_grad),
                "reference_params": sum(p.numel() for m in references for p in m.parameters()),
                "reference_bytes": _storage_bytes([p for m in references for p in m.parameters()])}
            if precision == "fp32":
                tf_config = students[0].config
                ddp_chunks, optimizer, _ = trainer._build_optimizer(config, tf_config, students)
                buffers = [b for c in ddp_chunks for b in c.buffers + c.expert_parallel_buffers]
                for buffer in buffers:
                    buffer.grad_data.fill_(1e-3)
                optimizer.step()
                state = [v for o in optimizer.chained_optimizers
                         for s in o.optimizer.state.values() for k, v in s.items()
                         if torch.is_tensor(v) and k != "step"]  # the step counters: 4 B a tensor
                counts["fp32"].update(grad_bytes=_storage_bytes([b.grad_data for b in buffers]),
                                      optimizer_bytes=_storage_bytes(state))
                counts["rank"] = {"pp": parallel_state.get_pipeline_model_parallel_rank(),
                                  "tp": parallel_state.get_tensor_model_parallel_rank(),
                                  "ep": parallel_state.get_expert_model_parallel_rank(),
                                  "dp": parallel_state.get_data_parallel_rank()}
                if "--num-moe-experts" in argv:
                    counts["sharding"] = _distributed_optimizer_groups(tf_config, students)
            parallel_state.destroy_model_parallel()
        found[name] = counts
    config = parse_config([*TINY, *LAYOUT_2X2])
    trainer._init_parallel_state(config)
    rank = {"pp": parallel_state.get_pipeline_model_parallel_rank(),
            "tp": parallel_state.get_tensor_model_parallel_rank()}
    parallel_state.destroy_model_parallel()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"rank": rank, "cases": found}, f)


def _distributed_optimizer_groups(tf_config, students):
    """How Megatron-Core's DDP groups the parameters for the distributed optimizer (which needs
    CUDA tensors itself): per buffer, expert-parallel or not, its parameters and the size of
    the data-parallel group its optimizer state is sharded over."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                           use_distributed_optimizer=True)
    groups = []
    for student in students:
        ddp = DistributedDataParallel(config=tf_config, ddp_config=config, module=student)
        for experts, buffers in ((False, ddp.buffers), (True, ddp.expert_parallel_buffers)):
            groups += [{"experts": experts, "params": sum(p.numel() for p in b.params),
                        "group": b.data_parallel_group.size()} for b in buffers]
    return groups


@pytest.mark.slow
@pytest.mark.distributed
def test_static_parts_equal_what_megatron_core_allocates(tmp_path):
    run_distributed(4, _count_on_rank, STATIC_CASES, str(tmp_path))
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted((r["rank"]["pp"], r["rank"]["tp"]) for r in ranks) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    for name, argv in STATIC_CASES.items():
        for rank in ranks:
            pp_rank = rank["rank"]["pp"]
            bf16 = memory.plan_stage(_run([*argv, "--bf16"], 4), pp_rank)
            fp32 = memory.plan_stage(_run([*argv, "--no-bf16"], 4), pp_rank)
            built_bf16, built_fp32 = rank["cases"][name]["bf16"], rank["cases"][name]["fp32"]
            where = f"{name}, rank {rank['rank']}"
            assert bf16.parameters_per_gpu == built_bf16["student_params"], where
            assert bf16.bytes["student_weights"] == built_bf16["student_bytes"], where
            assert bf16.bytes["reference_weights"] == built_bf16["reference_bytes"], where
            assert built_bf16["reference_params"] == built_bf16["student_params"], where
            assert fp32.bytes["student_weights"] == built_fp32["student_bytes"], where
            assert fp32.bytes["gradients"] == built_fp32["grad_bytes"], where
            assert fp32.bytes["optimizer"] == built_fp32["optimizer_bytes"], where
        # The whole model: TP-sharded parameters once, the replicated norms on both TP ranks,
        # and a tied output layer as the embedding's copy on the last stage.
        run = _run(argv, 4)
        built = sum(r["cases"][name]["bf16"]["student_params"] for r in ranks)
        norms = 2 * run.hidden_size * run.num_layers + run.hidden_size
        copy = 0 if run.untied else run.padded_vocab * run.hidden_size
        assert built == memory.total_parameters(run) + (run.tensor_parallel - 1) * norms + copy


LORA_STATIC_CASES = {
    "LoRA r4, untied, QKV bias": [*TINY, *LAYOUT_2X2, "--add-qkv-bias", "--lora-rank", "4"],
    "LoRA r3 on qkv and fc2, tied": [*TINY, *LAYOUT_2X2, "--no-untie-embeddings-and-output-weights",
                                     "--lora-rank", "3", "--lora-target-modules",
                                     "linear_qkv,linear_fc2"],
    "LoRA r8 on proj and fc1, interleaved, q/k norms": [
        *TINY, *LAYOUT_2X2, "--virtual-pipeline-model-parallel-size", "2", "--qk-layernorm",
        "--lora-rank", "8", "--lora-target-modules", "linear_proj,linear_fc1"],
}


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_static_parts_equal_what_megatron_core_allocates(tmp_path, monkeypatch):
    """LoRA GIFT's models as the engine builds them (``build_chunks`` with ``lora.rank``, the
    base frozen) on 4 gloo ranks at TP2 x PP2: every rank's parameters (base and adapters) and
    bytes, the trained ones (the adapters), Megatron-Core's DDP grad buffer and Adam's state
    (the adapters' alone) equal the planner's, and no reference model is built (the planner
    counts no reference weights). Over all ranks, the adapters are the model's once plus the
    TP copies of the replicated halves (a column linear's ``A``, a row linear's ``B``). A
    planner that gives the base gradients, or counts the reference as a model, fails."""
    from megatron_gift.planning import lora

    run_distributed(4, _count_on_rank, LORA_STATIC_CASES, str(tmp_path))
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]

    def planned(argv, precision, stage):
        return memory.plan_stage(_run([*argv, f"--{precision}"], 4), stage)

    for name, argv in LORA_STATIC_CASES.items():
        for rank in ranks:
            stage, where = rank["rank"]["pp"], f"{name}, rank {rank['rank']}"
            built_bf16, built_fp32 = rank["cases"][name]["bf16"], rank["cases"][name]["fp32"]
            bf16, fp32 = planned(argv, "bf16", stage), planned(argv, "no-bf16", stage)
            assert bf16.parameters_per_gpu == built_bf16["student_params"], where
            assert bf16.bytes["student_weights"] == built_bf16["student_bytes"], where
            assert memory.stage_trained_parameters(_run(argv, 4), stage) == (
                built_bf16["trained_params"]), where
            assert built_bf16["reference_params"] == bf16.bytes["reference_weights"] == 0, where
            assert fp32.bytes["student_weights"] == built_fp32["student_bytes"], where
            assert fp32.bytes["gradients"] == built_fp32["grad_bytes"], where
            assert fp32.bytes["optimizer"] == built_fp32["optimizer_bytes"], where
        run = _run(argv, 4)
        replicated = sum(run.lora_rank * lora.linear_shape(run, t)[t not in lora.COLUMN_PARALLEL]
                         for t in run.lora_targets)
        assert sum(r["cases"][name]["bf16"]["trained_params"] for r in ranks) == (
            memory.trained_parameters(run) + (run.tensor_parallel - 1) * replicated
            * run.num_layers), name
    # The check fails where it should: the base counted with gradients and optimizer state, or
    # the reference counted as a second copy of the weights.
    for planted in ({"stage_trained_parameters": memory.stage_parameters},
                    {"reference_weight_bytes": lambda run, stage: memory.weight_bytes(
                        run, memory.stage_parameters(run, stage), stage, False)}):
        with monkeypatch.context() as patch:
            for attribute, value in planted.items():
                patch.setattr(memory, attribute, value)
            for name, argv in LORA_STATIC_CASES.items():
                for rank in ranks:
                    built = rank["cases"][name]["fp32"]
                    plan = planned(argv, "no-bf16", rank["rank"]["pp"])
                    assert (plan.bytes["gradients"], plan.bytes["optimizer"],
                            plan.bytes["reference_weights"]) != (
                                built["grad_bytes"], built["optimizer_bytes"], 0), planted


# A tiny Qwen3-MoE: per-head q/k norms, a head dim of its own, 4 experts (top 2) of width 48,
# the first layer dense.
TINY_MOE = [*TINY, "--qk-layernorm", "--kv-channels", "16", "--num-moe-experts", "4",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48", "--moe-layer-freq",
            "[0,1,1,1]"]
EP2 = ["--expert-model-parallel-size", "2"]
MOE_STATIC_CASES = {
    "MoE TP2 x PP2, SP": [*TINY_MOE, *LAYOUT_2X2, "--sequence-parallel"],
    "MoE PP2 x DP2, EP2": [*TINY_MOE, "--pipeline-model-parallel-size", "2", *EP2],
    "MoE TP2 x DP2, SP, EP2, expert TP1": [*TINY_MOE, "--tensor-model-parallel-size", "2",
                                           "--sequence-parallel", *EP2,
                                           "--expert-tensor-parallel-size", "1"],
}


@pytest.mark.slow
@pytest.mark.distributed
def test_moe_static_parts_equal_what_megatron_core_allocates(tmp_path, monkeypatch):
    """Qwen3-MoE (q/k norms, a router, E / EP experts a GPU split over the experts' TP, a dense
    first layer) on 4 gloo ranks: the student's and the reference's parameters and bytes, the
    grad buffers (the experts' of their own) and Adam's state equal the planner's on every
    rank; and the distributed optimizer shards the experts' state over the expert data-parallel
    group (DP x CP x TP / (EP x ETP)), the rest over DP x CP, as Megatron-Core's DDP groups
    them (the buffers' padding left out, as the planner leaves it)."""
    run_distributed(4, _count_on_rank, MOE_STATIC_CASES, str(tmp_path))
    ranks = [json.loads(p.read_text())["cases"] for p in sorted(tmp_path.glob("rank*.json"))]
    for name, argv in MOE_STATIC_CASES.items():
        assert len({tuple(r[name]["rank"].values()) for r in ranks}) == 4, name
        for rank in ranks:
            built, where = rank[name], f"{name}, rank {rank[name]['rank']}"
            stage = built["rank"]["pp"]
            bf16, fp32 = _run([*argv, "--bf16"], 4), _run([*argv, "--no-bf16"], 4)
            planned_bf16, planned_fp32 = memory.plan_stage(bf16, stage), memory.plan_stage(fp32, stage)
            assert planned_bf16.parameters_per_gpu == built["bf16"]["student_params"], where
            assert planned_bf16.bytes["student_weights"] == built["bf16"]["student_bytes"], where
            assert planned_bf16.bytes["reference_weights"] == built["bf16"]["reference_bytes"], where
            assert planned_fp32.bytes["gradients"] == built["fp32"]["grad_bytes"], where
            assert planned_fp32.bytes["optimizer"] == built["fp32"]["optimizer_bytes"], where
            sharded = dataclasses.replace(fp32, distributed_optimizer=True)
            experts = memory.stage_expert_parameters(fp32, stage)
            groups = built["sharding"]
            # The experts have buffers of their own with EP > 1 or an expert TP of their own;
            # else they share the others' (over DP x CP: the expert data-parallel size then).
            own = any(g["experts"] for g in groups)
            assert own == (fp32.expert_parallel > 1 or fp32.etp != fp32.tensor_parallel), where
            assert sum(g["params"] for g in groups if g["experts"]) == (experts if own else 0)
            assert sum(g["params"] for g in groups if not g["experts"]) == (
                memory.stage_parameters(fp32, stage) - (experts if own else 0)), where
            assert memory.optimizer_shard(sharded, experts=True) == (
                memory.optimizer_shard(sharded) if not own else
                next(g["group"] for g in groups if g["experts"])), where
            for group in groups:
                assert group["group"] == memory.optimizer_shard(sharded, group["experts"]), where
            per_parameter = 8  # fp32 Adam: two fp32 moments (no main weights in fp32)
            assert memory.plan_stage(sharded, stage).bytes["optimizer"] == sum(
                g["params"] * per_parameter // g["group"] for g in groups), where
    # The check fails where it should: a planner that counts all E experts on every EP rank.
    monkeypatch.setattr(memory, "layer_expert_parameters", lambda run: (
        run.num_experts * 3 * run.moe_ffn_hidden_size * run.hidden_size // run.etp))
    for name, argv in MOE_STATIC_CASES.items():
        for rank in ranks:
            planned = memory.plan_stage(_run([*argv, "--bf16"], 4), rank[name]["rank"]["pp"])
            built = rank[name]["bf16"]["student_params"]
            assert (planned.parameters_per_gpu == built) == ("EP2" not in name), name


# ---------------------------------------------------------------------------------------------
# Mixture of experts: Qwen3-30B-A3B's recipe

QWEN3_MOE = os.path.join(RECIPES, "qwen3-30b-a3b-gift.yaml")


def test_qwen3_moe_parameters_and_their_sharding_over_experts():
    """Qwen3-30B-A3B (48 layers, all MoE, 128 experts of width 768, top 8) counted by hand:
    30.53 B parameters, 3.35 B a token goes through; at EP8 on 16 GPUs each holds 16 experts
    a layer, whose Adam state the distributed optimizer shards over the 2 ranks holding the
    same experts (the rest over all 16), and whose gradients are a buffer of their own."""
    run = memory.run_from_config(parse_config(["--config", QWEN3_MOE]), 16)
    h, layers, vocab = 2048, 48, 151936  # the vocab is a multiple of 128 already
    expert = 3 * 768 * h
    attention = (32 + 2 * 4) * 128 * h + h * 32 * 128
    layer = 2 * h + 2 * 128 + attention + 128 * h + 128 * expert
    total = layers * layer + h + 2 * vocab * h
    assert memory.total_parameters(run) == total == 30_532_122_624
    assert memory.active_parameters(run) == total - layers * 120 * expert == 3_353_032_704
    assert (run.expert_parallel, run.etp, run.expert_data_parallel) == (8, 1, 2)
    experts = layers * 16 * expert
    stage = memory.plan_stage(run, 0)
    assert memory.stage_expert_parameters(run, 0) == experts
    assert stage.parameters_per_gpu == total - layers * 128 * expert + experts
    dense = stage.parameters_per_gpu - experts
    assert stage.bytes["gradients"] == 4 * stage.parameters_per_gpu  # fp32 grad buffers
    assert stage.bytes["optimizer"] == dense * 12 // 16 + experts * 12 // 2
    assert stage.bytes["reference_weights"] == stage.bytes["student_weights"] == (
        2 * stage.parameters_per_gpu)
    tokens = 128 * 8192
    scores = 4 * 8192 * 32 * 128 * layers
    # 6 N a token for the student, 2 N for the reference, 2 N for full recompute's forward.
    assert memory.step_flops(run) == tokens * (10 * memory.active_parameters(run) + 5 * scores)


@pytest.mark.parametrize("freq", ["1", "2", "3", "[0,1,1,1]", "[1,0,0,1]"])
def test_the_moe_layers_are_the_models(freq):
    """Which layers are MoE, as the model reads ``moe_layer_freq``; a dense model has none."""
    from megatron_gift.hf.architecture import moe_layers

    config = parse_config([*TINY_MOE, "--moe-layer-freq", freq])
    run = memory.run_from_config(config)
    assert run.moe_layers == tuple(moe_layers(config.model))
    assert [memory.is_moe_layer(run, i) for i in range(4)] == moe_layers(config.model)
    assert not any(memory.is_moe_layer(_run(TINY), i) for i in range(4))


def test_qwen3_moe_activations_by_term():
    """One MoE layer of the recipe (TP1, EP8, CUDA's all-to-all dispatcher, fused SwiGLU,
    Transformer Engine's layers), a micro-batch of one 8192-token sequence: the router keeps
    the softmax of the 8 chosen logits and their indices; the dispatcher two int64 indices of
    the 8 copies of each token and the 65536 copies' probabilities; the experts those copies'
    fc1 input, fc1 output and fc2 input; the q/k norms a bf16 copy and 1/rms per head."""
    run = memory.run_from_config(parse_config(["--config", QWEN3_MOE]), 16)
    T, k, h, ffn = 8192, 8, 2048, 768
    n = T * k  # balanced: every GPU's experts take T x k copies, whatever the EP
    assert memory.moe_tokens(run) == n
    terms = memory.layer_activations(run, moe=True)
    assert "mlp" not in terms
    assert terms["router"] == T * (4 * k + 8 * k)
    assert terms["dispatch"] == 2 * 8 * T * k + 2 * n
    assert terms["experts"] == n * (2 * h + ffn * (2 * 2 + 2))
    assert terms["qk_norms"] == T * (32 + 4) * (2 * 128 + 4)
    assert terms["norms"] == T * (2 * 2 * h + (2 + 2) * h + 2 * 4)
    twice = dataclasses.replace(run, moe_imbalance=2.0)
    assert memory.layer_activations(twice, moe=True)["experts"] == 2 * terms["experts"]
    cpu = dataclasses.replace(run, device="cpu", layer_spec="local", fused_swiglu=False)
    assert memory.layer_activations(cpu, moe=True)["dispatch"] == (
        8 * n + 128 * T * (2 + 1) + 2 * n)  # all-gather: masked_select's [E/EP, T x EP] inputs


def test_the_suggestion_searches_expert_parallelism():
    """EP is searched where it divides the experts and, times the experts' TP, TP x CP x DP;
    the recipe at EP1 is told EP8, and on one node, where nothing fits, the layout on the fewest
    GPUs, none on fewer fitting (an oracle over TP, PP, DP and EP)."""
    config = parse_config(["--config", QWEN3_MOE, "--expert-model-parallel-size", "1"])
    run = memory.run_from_config(config, 16)
    assert memory.expert_parallel_options(run, 1, 12) == [1, 2, 4]
    assert memory.expert_parallel_options(run, 2, 16) == [1, 2, 4, 8, 16]  # expert TP 2
    expert_tp1 = dataclasses.replace(run, expert_tensor_parallel=1)
    assert memory.expert_parallel_options(expert_tp1, 2, 16) == [1, 2, 4, 8, 16, 32]
    assert memory.expert_parallel_options(_run(TINY), 1, 16) == [1]
    result = memory.plan(run)
    assert not result.fits
    assert result.suggestion.startswith("--expert-model-parallel-size 8 (then 64.1 GiB")
    assert result.suggested_run == dataclasses.replace(run, expert_parallel=8)
    one_node = memory.plan(memory.run_from_config(config, 8))
    suggested = one_node.suggested_run
    assert suggested.num_gpus > 8 and memory.plan(suggested, suggest=False).fits
    assert "--expert-model-parallel-size" in one_node.suggestion
    checked = 0
    for tp, pp, dp in itertools.product((1, 2, 4), (1, 2, 3, 4, 6, 8), range(1, 17)):
        if 8 <= tp * pp * dp < suggested.num_gpus and 128 % dp == 0:
            for ep in (e for e in (1, 2, 4, 8, 16) if dp % e == 0):  # the experts' TP is TP
                layout = dataclasses.replace(
                    run, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp,
                    expert_parallel=ep, sequence_parallel=tp > 1)
                assert not memory.plan(layout, suggest=False).fits, layout
                checked += 1
    assert checked >= 15


def test_the_moe_plan_names_its_experts(capsys):
    code, out, _ = _command(capsys, "--config", QWEN3_MOE, "--num-gpus", "16")
    assert code == 0
    assert re.search(r"^experts\s+128 a MoE layer \(48 of 48 layers\), top 8: ETP 1 x EP 8 x "
                     r"PP 1 x EDP 2, 16 experts a GPU; activations for a balanced router$",
                     out, re.M)
    assert "30.53 B parameters (3.35 B active)" in out
    code, out, _ = _command(capsys, "--config", QWEN3_MOE, "--num-gpus", "16", "--json")
    plan = json.loads(out)
    assert plan["layout"]["expert_model_parallel_size"] == 8
    assert plan["layout"]["expert_tensor_parallel_size"] == 1
    assert plan["parameters"]["student_active"] == 3_353_032_704
    _, out, _ = _command(capsys, *QWEN_7B)
    assert not re.search(r"^experts", out, re.M)


# ---------------------------------------------------------------------------------------------
# Activations: within 15% of what autograd keeps, per rank and micro-batch


class _SavedTensors:
    """Bytes of the distinct storages autograd holds for the backward, live and at their peak,
    from ``saved_tensors_hooks``: a storage counts once however many views of it are saved,
    and not at all when it belongs to a parameter. Tensors saved while ``kind`` is "loss" are
    the loss's."""

    def __init__(self, exclude):
        self.exclude, self.refs, self.kind = exclude, {}, "model"
        self.live = {"model": 0, "loss": 0}
        self.peak = dict(self.live)

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        return tensor if key in self.exclude else _Held(self, tensor, key)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tracker, tensor, key):
        self.tracker, self.tensor, self.key = tracker, tensor, key
        entry = tracker.refs.get(key)
        if entry is not None:
            entry[0] += 1
            return
        size = tensor.untyped_storage().nbytes()
        tracker.refs[key] = [1, size, tracker.kind]
        tracker.live[tracker.kind] += size
        tracker.peak[tracker.kind] = max(tracker.peak[tracker.kind], tracker.live[tracker.kind])

    def __del__(self):
        entry = self.tracker.refs[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.tracker.refs[self.key]
            self.tracker.live[entry[2]] -= entry[1]


def _batch(micro_batch_size, seq, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (micro_batch_size, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone(),
            "loss_mask": torch.ones(micro_batch_size, seq),
            "position_ids": torch.arange(seq).repeat(micro_batch_size, 1)}


def _measure_on_rank(cases, out_dir):
    """For each case: the engine's student and reference, Megatron's schedule over the case's
    micro-batches with the GIFT loss; the peak bytes of saved tensors, the model's and the
    loss's, on this rank. A ``fused`` case runs the student's SwiGLU as Megatron-Core's fused
    autograd function (``bias_activation_fusion``, the engine's setting with CUDA), eagerly:
    what it saves does not depend on torch.compile, which on a CPU would start a compiler."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gift.core.model import GiftModel
    from megatron_gift.engine import pipeline, trainer

    found = {}
    for name, (argv, micro_batches, fused) in cases.items():
        config = parse_config(argv)
        trainer._init_parallel_state(config)
        _, _, students, references = trainer._build_models(config)
        routed = []  # tokens each of the student's MoE layers gives its local experts
        for module in (m for student in students for m in student.modules()):
            if hasattr(module, "config"):  # experts narrower than ffn have a config of their own
                module.config.bias_activation_fusion = fused  # read by MLP.forward
            if type(module).__name__ == "SequentialMLP":
                module.register_forward_pre_hook(
                    lambda _, args, routed=routed: routed.append(args[0].shape[0]))
        # LoRA: no reference model; the student's base (adapters off) is the reference.
        references = references or []
        chunks = [GiftModel(s, r, reference_is_base=config.lora.rank is not None)
                  for s, r in itertools.zip_longest(students, references)]
        params = {p.untyped_storage().data_ptr()
                  for m in students + references for p in m.parameters()}
        tracker = _SavedTensors(params)
        step = pipeline.forward_step_func(GiftLoss(config.gift.beta, 0.0, config.model.vocab_size),
                                          pipeline.causal_attention_mask)

        def tagged(data_iterator, model, step=step, tracker=tracker):
            output, loss_func = step(data_iterator, model)
            if loss_func is None:
                return output, None

            def loss(out):
                tracker.kind = "loss"
                try:
                    return loss_func(out)
                finally:
                    tracker.kind = "model"
            return output, loss

        b, s = config.training.micro_batch_size, config.model.seq_length
        batches = [_batch(b, s, seed=k) for k in range(micro_batches)]
        vpp = config.parallel.virtual_pipeline_model_parallel_size
        adjust = (pipeline.shapes_with_reference(config.model.hidden_size)
                  if config.parallel.pipeline_model_parallel_size > 1 and vpp is None else None)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack), \
                torch.compiler.set_stance("force_eager"):
            get_forward_backward_func()(
                forward_step_func=tagged,
                data_iterator=[iter(batches) for _ in chunks] if vpp else iter(batches),
                model=chunks, num_microbatches=micro_batches, seq_length=s,
                micro_batch_size=b, forward_only=False, adjust_tensor_shapes_fn=adjust)
        found[name] = {"pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                       "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                       "model": tracker.peak["model"], "loss": tracker.peak["loss"],
                       "left": tracker.live["model"] + tracker.live["loss"], "routed": routed}
        parallel_state.destroy_model_parallel()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(found, f)


ACTIVATION_MODEL = [*TINY, "--bf16", "--gift-beta", "20"]
MOE = TINY_MOE[len(TINY):]  # the MoE flags
LORA = ["--lora-rank", "4"]
FULL = ["--recompute-granularity", "full", "--recompute-method"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
ACTIVATION_CASES = {
    "tp2": {
        "TP2": ([*TP2], 2),
        "TP2 SP": ([*TP2, "--sequence-parallel"], 2),
        "TP2 selective": ([*TP2, "--recompute-granularity", "selective"], 2),
        "TP2 SP selective": ([*TP2, "--sequence-parallel", "--recompute-granularity",
                              "selective"], 2),
        "TP2 full uniform 2": ([*TP2, *FULL, "uniform", "--recompute-num-layers", "2"], 2),
        "TP2 SP full block 1": ([*TP2, "--sequence-parallel", *FULL, "block",
                                 "--recompute-num-layers", "1"], 2),
        "TP2, fused SwiGLU": ([*TP2], 2),
        "TP2 SP selective, fused SwiGLU": ([*TP2, "--sequence-parallel",
                                            "--recompute-granularity", "selective"], 2),
    },
    "pp2": {
        "PP2 1F1B": ([*PP2], 4),
        "PP2 1F1B, 1 micro-batch": ([*PP2], 1),
        "PP2 interleaved": ([*PP2, "--virtual-pipeline-model-parallel-size", "2"], 4),
        "PP2 1F1B, fused SwiGLU": ([*PP2], 4),
    },
    "moe": {
        "MoE TP2 SP": ([*MOE, *TP2, "--sequence-parallel"], 2),
        "MoE TP2 SP selective": ([*MOE, *TP2, "--sequence-parallel", "--recompute-granularity",
                                  "selective"], 2),
        "MoE TP2 SP full uniform 1": ([*MOE, *TP2, "--sequence-parallel", *FULL, "uniform",
                                       "--recompute-num-layers", "1"], 2),
        "MoE EP2": ([*MOE, *EP2], 2),
        "MoE EP2, aux loss, softmax before the top-k": (
            [*MOE, *EP2, "--moe-aux-loss-coeff", "0.01", "--no-moe-norm-topk-prob"], 2),
        "MoE EP2, fused SwiGLU": ([*MOE, *EP2], 2),
        "MoE PP2 1F1B": ([*MOE, *PP2], 4),
    },
    "lora": {
        "LoRA TP2": ([*LORA, *TP2], 2),
        "LoRA TP2 SP": ([*LORA, *TP2, "--sequence-parallel"], 2),
        "LoRA TP2 SP selective": ([*LORA, *TP2, "--sequence-parallel",
                                   "--recompute-granularity", "selective"], 2),
        "LoRA TP2 SP full uniform 2": ([*LORA, *TP2, "--sequence-parallel", *FULL, "uniform",
                                        "--recompute-num-layers", "2"], 2),
        "LoRA TP2 full block 1": ([*LORA, *TP2, *FULL, "block", "--recompute-num-layers", "1"],
                                  2),
        "LoRA TP2 SP, dropout, qkv and fc2": ([*LORA, *TP2, "--sequence-parallel",
                                               "--lora-dropout", "0.1", "--lora-target-modules",
                                               "linear_qkv,linear_fc2"], 2),
        "LoRA TP2, q/k norms, dropout, fc1 alone": ([*LORA, *TP2, "--qk-layernorm",
                                                     "--lora-dropout", "0.1",
                                                     "--lora-target-modules", "linear_fc1"], 2),
        "LoRA TP2 SP selective, proj and fc2, fused SwiGLU": (
            [*LORA, *TP2, "--sequence-parallel", "--recompute-granularity", "selective",
             "--lora-target-modules", "linear_proj,linear_fc2"], 2),
        "LoRA PP2 1F1B": ([*LORA, *PP2], 4),
        "LoRA PP2 interleaved, fused SwiGLU": ([*LORA, *PP2,
                                                "--virtual-pipeline-model-parallel-size", "2"], 4),
    },
}
ACTIVATION_TOLERANCE = 0.15


# The MoE cases are held closer (measured: exact): at this size even their experts counted
# twice move the total by only 10-16%, so 15% would not see a missing or extra MoE tensor.
MOE_ACTIVATION_TOLERANCE = 0.01
# The LoRA cases likewise (measured: exact, but for the int32 a selective checkpoint keeps per
# layer): a column adapter's gathered input under SP is 4-6% of their totals.
LORA_ACTIVATION_TOLERANCE = 0.01


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("group", sorted(ACTIVATION_CASES))
def test_activations_are_within_15_percent_of_what_autograd_keeps(tmp_path, group, monkeypatch):
    """The peak of the live saved tensors of each stage's worst TP rank, over a whole step of
    Megatron's schedule, against the planner's activations for the local layers the CPU runs;
    the loss's saved buffer against the planner's. (Measured: exact to 16 bytes, an int32 the
    selective checkpoint keeps per layer.) The MoE cases (Qwen3-MoE's q/k norms, router,
    all-gather dispatcher and experts) within :data:`MOE_ACTIVATION_TOLERANCE`, with the
    planner told how unevenly the step routed its tokens over EP ranks; a planner that gives
    every EP rank the token copies of all the experts fails them. The LoRA cases (the engine's
    LoRA models: frozen base, adapters on all or some linears, dropout, the reference the base
    under ``no_grad``) within :data:`LORA_ACTIVATION_TOLERANCE`; a planner whose column adapters
    share the base's sequence shard under SP, instead of keeping their gathered input, fails
    them."""
    cases = {name: ([*ACTIVATION_MODEL, *argv, "--global-batch-size", str(2 * micro_batches)],
                    micro_batches, name.endswith("fused SwiGLU"))
             for name, (argv, micro_batches) in ACTIVATION_CASES[group].items()}
    run_distributed(2, _measure_on_rank, cases, str(tmp_path))
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    report = []
    tolerance = {"moe": MOE_ACTIVATION_TOLERANCE,
                 "lora": LORA_ACTIVATION_TOLERANCE}.get(group, ACTIVATION_TOLERANCE)
    for name, stage, planned, measured, loss in _planned_and_measured(cases, ranks, report):
        assert abs(planned / measured - 1) <= tolerance, "\n".join(report)
        if loss is not None:
            assert abs(loss[0] / loss[1] - 1) <= ACTIVATION_TOLERANCE, "\n".join(report)
    print("\n".join(report))
    if group == "lora":
        _lora_shard_fails(cases, ranks, monkeypatch)
    if group != "moe":
        return
    # The check fails where it should: the experts of every EP rank counted as all E experts
    # (each taking its share of the token copies of the whole EP group).
    tokens = memory.moe_tokens
    monkeypatch.setattr(memory, "moe_tokens", lambda run: tokens(run) * run.expert_parallel)
    for name, _, planned, measured, _ in _planned_and_measured(cases, ranks, []):
        if "EP2" in name:
            assert planned / measured - 1 > MOE_ACTIVATION_TOLERANCE, (name, planned, measured)


def _lora_shard_fails(cases, ranks, monkeypatch):
    """A planner whose column adapters keep only this rank's sequence shard under SP (as if
    they shared the base's input) misses every SP case with one by more than the
    tolerance."""
    from megatron_gift.planning import lora

    adapter = lora.adapter_activations

    def shard(run, name, tokens):
        sp = run.sequence_parallel and name in lora.COLUMN_PARALLEL
        return adapter(run, name, tokens / (run.tensor_parallel if sp else 1))

    monkeypatch.setattr(lora, "adapter_activations", shard)
    for name, _, planned, measured, _ in _planned_and_measured(cases, ranks, []):
        run = _run(cases[name][0], 2)
        if run.sequence_parallel and set(run.lora_targets) & set(lora.COLUMN_PARALLEL):
            assert planned / measured - 1 < -LORA_ACTIVATION_TOLERANCE, (name, planned, measured)


def _planned_and_measured(cases, ranks, report):
    """For each case and stage: ``(name, stage, planned, measured, loss)``, the planner's
    activations and the peak measured on the stage's worst rank, and on the last stage the
    loss's saved buffer ``(planned, measured)`` (None elsewhere, where it measured nothing);
    each line appended to ``report``."""
    for name, (argv, micro_batches, fused) in cases.items():
        run = dataclasses.replace(_run(argv, 2, layer_spec="local", device="cpu"),
                                  fused_swiglu=fused)
        assert all(rank[name]["left"] == 0 for rank in ranks), f"{name}: saved tensors outlived"
        for stage in range(run.pipeline_parallel):
            # The planner's GPU is a stage's worst TP rank (the loss: the one whose vocab
            # shard is all real tokens).
            on_stage = [rank[name] for rank in ranks if rank[name]["pp_rank"] == stage]
            measured = {k: max(r[k] for r in on_stage) for k in ("model", "loss")}
            imbalance = _routed_imbalance(run, [r["routed"] for r in on_stage], micro_batches)
            if imbalance != 1:
                report.append(f"{name} stage {stage}: planned "
                              f"{memory.stage_activations(run, stage)} for a balanced router, "
                              f"{imbalance:.3f} x its tokens measured")
                run = dataclasses.replace(run, moe_imbalance=imbalance)
            planned = memory.stage_activations(run, stage)
            report.append(f"{name} stage {stage}: planned {planned}, measured "
                          f"{measured['model']} ({planned / measured['model'] - 1:+.1%})")
            loss = None
            if stage == run.pipeline_parallel - 1:
                loss = memory.loss_terms(run)["saved"], measured["loss"]
                report.append(f"{name} loss: planned {loss[0]}, measured {loss[1]} "
                              f"({loss[0] / loss[1] - 1:+.1%})")
            else:
                assert measured["loss"] == 0
            yield name, stage, planned, measured["model"], loss


def _routed_imbalance(run, routed, micro_batches):
    """The planner's ``moe_imbalance`` for what a step routed to the experts of a stage's
    ranks (``routed``: per rank, the tokens each MoE layer forward gave its local experts):
    1 with EP 1, where every GPU takes all ``rows x ETP x topk`` token copies; with EP, the
    busiest micro-batch of the busiest rank over the balanced count (one micro-batch in
    flight, no recompute)."""
    sp = run.tensor_parallel if run.sequence_parallel else 1
    balanced = run.seq_length * run.micro_batch_size // sp * run.etp * run.moe_topk
    if run.expert_parallel == 1:
        assert all(n == balanced for tokens in routed for n in tokens), (routed, balanced)
        return 1.0
    assert run.pipeline_parallel == 1 and run.recompute_granularity is None
    layers = sum(run.moe_layers)
    assert all(len(tokens) == layers * micro_batches for tokens in routed)
    return max(sum(tokens[i:i + layers]) for tokens in routed
               for i in range(0, len(tokens), layers)) / (layers * balanced)


def _attention_peak_on_rank(cases, out_dir):
    """For each case: the peak bytes Megatron-Core's local attention (``DotProductAttention``)
    allocates in one forward and backward, its ``"mpu"`` score buffer included (made at its
    first call, inside the count), its inputs not."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_gift.core import model
    from megatron_gift.engine import trainer

    found = {}
    for name, argv in cases.items():
        config = parse_config(argv)
        trainer._init_parallel_state(config)
        dtype = torch.bfloat16 if config.training.bf16 else torch.float32
        attention = DotProductAttention(model.transformer_config(config, dtype), layer_number=1,
                                        attn_mask_type=AttnMaskType.causal,
                                        attention_type="self")
        s, b, d = config.model.seq_length, config.training.micro_batch_size, 8
        heads, groups = config.model.num_attention_heads, config.model.num_query_groups
        q, k, v = (torch.randn(s, b, n, d, dtype=dtype, requires_grad=True)
                   for n in (heads, groups, groups))
        mask = torch.ones(b, 1, s, s, dtype=torch.bool).triu(1)
        with _live_bytes([q, k, v, mask]) as meter:
            out = attention(q, k, v, mask)
            out.backward(torch.ones_like(out))
            del out
        found[name] = meter.peak
        parallel_state.destroy_model_parallel()
    with open(os.path.join(out_dir, "peaks.json"), "w") as f:
        json.dump(found, f)


# Long enough that the [b, a, s, s] tensors are 99% of what the attention allocates.
ATTENTION_MODEL = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "8",
                   "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "1024",
                   "--vocab-size", "300", "--micro-batch-size", "1", "--lora-rank", "4"]
ATTENTION_CASES = {"bf16": [*ATTENTION_MODEL, "--bf16"], "fp32": [*ATTENTION_MODEL, "--no-bf16"]}


@pytest.mark.distributed
def test_the_local_attentions_workspace_is_what_it_allocates(tmp_path, monkeypatch):
    """What a LoRA run's attention (Megatron-Core's local ``DotProductAttention``) keeps and
    works on: its peak over one forward and backward, measured, against the planner's scores
    it keeps plus its workspace (``12 + e`` bytes a ``[b, a, s, s]`` element in all: the
    kept buffer of raw scores, the fp32 softmax, its gradient and its input's), within 2%
    (measured: -0.4% bf16, -0.6% fp32; the rest is O(s d)). A planner without the kept buffer
    misses it."""
    run_distributed(1, _attention_peak_on_rank, ATTENTION_CASES, str(tmp_path))
    measured = json.loads((tmp_path / "peaks.json").read_text())

    def planned(name):
        run = _run(ATTENTION_CASES[name], 1)
        return memory._local_scores(run) + memory.local_attention_workspace(run)

    for name in ATTENTION_CASES:
        print(f"{name}: planned {planned(name)}, measured {measured[name]} "
              f"({planned(name) / measured[name] - 1:+.2%})")
        assert abs(planned(name) / measured[name] - 1) <= 0.02, name
    workspace = memory.local_attention_workspace
    monkeypatch.setattr(memory, "local_attention_workspace", lambda run: workspace(run) - (
        run.micro_batch_size * run.num_attention_heads * run.seq_length ** 2 * run.param_bytes))
    for name in ATTENTION_CASES:
        assert planned(name) / measured[name] - 1 < -0.02, name


def test_the_in_flight_count_is_megatrons():
    """1F1B keeps PP - rank micro-batches (fewer when the step has fewer); interleaving keeps
    Megatron's warm-up + 1 chunk-forwards; without pipelining one."""
    run = _run([*LLAMA_70B, "--global-batch-size", "8"], 32)
    assert [memory.in_flight(run, r) for r in range(4)] == [4, 3, 2, 1]
    few = dataclasses.replace(run, global_batch_size=2)
    assert [memory.in_flight(few, r) for r in range(4)] == [2, 2, 2, 1]
    interleaved = dataclasses.replace(run, virtual_pipeline=2)
    assert [memory.in_flight(interleaved, r) for r in range(4)] == [11, 9, 7, 5]
    assert memory.in_flight(dataclasses.replace(run, pipeline_parallel=1), 0) == 1


def test_the_loss_workspace_is_the_losss():
    """The planner's row-chunk workspace is the one megatron_gift.loss allocates on the CPU."""
    import torch

    from megatron_gift.loss.eager import _Workspace

    for rows, vocab in ((64, 300), (5000, 50000), (3, 1 << 23)):
        workspace = _Workspace(torch.empty(rows, vocab, dtype=torch.bfloat16), torch.float32, 2)
        run = dataclasses.replace(_run(TINY), seq_length=rows, micro_batch_size=1, vocab_size=vocab,
                             device="cpu")
        assert memory.loss_terms(run)["workspace"] == _storage_bytes([workspace.buffers])


# ---------------------------------------------------------------------------------------------
# The fused head: the planner's terms against the bytes its code allocates


def _live_bytes(exclude):
    """A ``TorchDispatchMode`` that counts the bytes of every storage an op creates, from its
    creation until the storage is freed (``weakref.finalize``), live and at their peak
    (``.live``, ``.peak``). Views and in-place results count once; the storages of
    ``exclude`` (the inputs) not at all."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {t.untyped_storage()._cdata for t in exclude}
            self.live = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._created(tensor.untyped_storage())
            return out

        def _created(self, storage):
            key = storage._cdata
            if key in self.seen:
                return
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())

        def _freed(self, key, size):
            self.seen.discard(key)
            self.live -= size

    return LiveBytes()


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    """The fused head's GPU path on the CPU: bf16 weights enter its GEMMs as they are
    (``_multiplies_in_low_precision``), CUDA's ``out_dtype`` GEMMs (``aten::mm.dtype``,
    ``aten::addmm.dtype_out``: fp32 accumulation and result) get a CPU kernel that allocates
    what CUDA's does, the result (its own temporaries run below the measuring mode), and the
    tiles go through the loss's Triton passes in Triton's interpreter, whose reference cycles
    are collected after each launch (a GPU launch keeps no reference to its arguments)."""
    import contextlib
    import gc

    import torch

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (conftest turns it on where CUDA is missing)")
    from megatron_gift.loss import fused_head, triton_kernels

    def mm(a, b, out_dtype):
        return torch.mm(a.to(out_dtype), b.to(out_dtype))

    def addmm(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        return torch.addmm(acc, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)

    launch = triton_kernels._launch

    @contextlib.contextmanager
    def launch_then_collect(x):
        with launch(x) as grid:
            yield grid
        gc.collect(0)

    library = torch.library.Library("aten", "IMPL")
    library.impl("mm.dtype", mm, "CPU")
    library.impl("addmm.dtype_out", addmm, "CPU")
    monkeypatch.setattr(fused_head, "_multiplies_in_low_precision",
                        lambda weight, dtype: dtype == torch.float32
                        and weight.dtype in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(triton_kernels, "_launch", launch_then_collect)
    yield
    library._destroy()


def _fused_head_peak(run) -> int:
    """Peak bytes the fused head allocates for one micro-batch of ``run`` (TP 1) in forward and
    backward, called as the trainer calls it: each model's hidden states ``[s, b, H]`` handed
    in transposed, ``loss.sum()`` differentiated (the returned gradients count, the inputs
    not); the eager passes, or for a CUDA run the Triton ones (:func:`cuda_path_on_cpu`)."""
    import torch

    from megatron_gift.loss.fused_head import fused_gift_head_loss

    dtype = torch.bfloat16 if run.param_bytes == 2 else torch.float32
    g = torch.Generator().manual_seed(0)
    s, b, h, rows = run.seq_length, run.micro_batch_size, run.hidden_size, run.padded_vocab
    hidden = torch.randn(s, b, h, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(rows, h, generator=g)).to(dtype).requires_grad_(not run.lora)
    labels = torch.randint(0, run.vocab_size, (b, s), generator=g)
    labels[:, :3] = -100
    ref_hidden = torch.randn(s, b, h, generator=g).to(dtype)
    ref_weight = (0.3 * torch.randn(rows, h, generator=g)).to(dtype)
    reference = (ref_hidden.transpose(0, 1), ref_weight) if run.reference else (None, None)
    with _live_bytes([hidden, weight, labels, ref_hidden, ref_weight]) as meter:
        loss = fused_gift_head_loss(
            hidden.transpose(0, 1), weight, labels, *reference,
            beta=20.0 if run.reference else math.inf, smooth_lambda=0.1 if run.smooth else 0.0,
            vocab_size=run.vocab_size, chunk_tokens=run.head_chunk_tokens, check_labels=False,
            implementation="triton" if run.device == "cuda" else "eager")
        torch.autograd.grad(loss.sum(), [hidden] if run.lora else [hidden, weight])
    return meter.peak


def _fused_head_planned(run) -> int:
    """The planner's fused head without the hidden states it is handed (made before the call)."""
    terms = memory.loss_terms(run)
    return sum(terms.values()) - terms["reference_hidden"] - terms["gathered_hidden"]


# The planner leaves out what is O(c + T) bytes (row temporaries, the [c, 7] statistics, the
# forward's label masks; measured: 0.2% here, far less at a real vocab) beside terms of
# O(c R + V H + T H). 10% is below any one term of these cases, a [c, R] tile included
# (asserted), so a missing or extra tile or accumulator fails.
FUSED_HEAD_TOLERANCE = 0.10
FUSED_HEAD_RUN = dict(seq_length=128, micro_batch_size=1, hidden_size=32, vocab_size=2000,
                      vocab_multiple=128, param_bytes=2, device="cpu", head="fused",
                      reference=True, smooth=False)  # V 2000 padded to 2048
FUSED_HEAD_CASES = {
    "fp32, reference, chunk divides T": dict(param_bytes=4, head_chunk_tokens=64),
    "fp32, beta inf, 2 sequences, chunk does not divide T": dict(
        param_bytes=4, reference=False, micro_batch_size=2, head_chunk_tokens=48),
    "bf16, reference smoothed, 2 sequences, chunk does not divide T": dict(
        smooth=True, micro_batch_size=2, head_chunk_tokens=48),
    "bf16, beta inf, one chunk (the default)": dict(reference=False, head_chunk_tokens=None),
    "fp32, beta inf, small chunks: the backward's peak": dict(
        param_bytes=4, reference=False, seq_length=512, hidden_size=256, head_chunk_tokens=8),
    "CUDA path, bf16, reference smoothed, 2 sequences, chunk does not divide T": dict(
        device="cuda", seq_length=64, micro_batch_size=2, head_chunk_tokens=48, smooth=True),
    "CUDA path, bf16, beta inf, one chunk (the default)": dict(
        device="cuda", seq_length=64, reference=False, head_chunk_tokens=None),
    "CUDA path, bf16, reference, small chunks: the backward's peak": dict(
        device="cuda", seq_length=32, hidden_size=256, head_chunk_tokens=4),
    # LoRA: the output weight is frozen (no weight gradient, kept or returned).
    "bf16, LoRA, reference, 2 sequences, chunk does not divide T": dict(
        micro_batch_size=2, head_chunk_tokens=48, lora_rank=4),
    "fp32, LoRA, beta inf, small chunks: the backward's peak": dict(
        param_bytes=4, reference=False, seq_length=512, hidden_size=256, head_chunk_tokens=8,
        lora_rank=4),
    "CUDA path, bf16, LoRA, reference, small chunks": dict(
        device="cuda", seq_length=32, hidden_size=256, head_chunk_tokens=4, lora_rank=4),
}


@pytest.mark.parametrize("name", sorted(FUSED_HEAD_CASES))
def test_the_fused_heads_plan_is_what_it_allocates(name, request):
    """``loss_terms`` of ``gift.head: fused`` against the peak of the live bytes the head's
    forward and backward allocate on the CPU (fp32 and bf16, with a reference and at beta
    inf, one chunk or several, the last one short, each phase at the peak), within
    :data:`FUSED_HEAD_TOLERANCE`. The CUDA cases run its GPU path (bf16 weights in the GEMMs
    as they are, the Triton passes) on the CPU (:func:`cuda_path_on_cpu`)."""
    changes = {**FUSED_HEAD_RUN, **FUSED_HEAD_CASES[name]}
    if changes["device"] == "cuda":
        request.getfixturevalue("cuda_path_on_cpu")
    run = dataclasses.replace(_run(TINY), **changes)
    planned, measured = _fused_head_planned(run), _fused_head_peak(run)
    assert abs(planned / measured - 1) <= FUSED_HEAD_TOLERANCE, (name, planned, measured)
    backward_peak = memory.loss_terms(run)["backward_excess"] > 0
    assert backward_peak == ("backward" in name)
    tokens = run.seq_length * run.micro_batch_size
    tile = min(run.head_chunk_tokens or tokens, tokens) * run.vocab_size * 4  # fp32 [c, R]
    assert backward_peak or tile > FUSED_HEAD_TOLERANCE * measured
    print(f"{name}: planned {planned}, measured {measured} ({planned / measured - 1:+.2%})")


def test_a_fused_head_keeping_one_more_tile_fails_its_check(monkeypatch):
    """The check above can fail: a head that keeps one more ``[c, R]`` tile through its
    statistics, or a planner without the fp32 copies of the bf16 weights (CPU), is off by
    more than the tolerance."""
    import torch

    from megatron_gift.loss import fused_head

    run = dataclasses.replace(_run(TINY), **FUSED_HEAD_RUN, head_chunk_tokens=64)
    planned, measured = _fused_head_planned(run), _fused_head_peak(run)
    assert abs(planned / measured - 1) <= FUSED_HEAD_TOLERANCE
    assert abs((planned - memory.loss_terms(run)["weight_copies"]) / measured
               - 1) > FUSED_HEAD_TOLERANCE
    statistics = fused_head._statistics

    def one_more_tile(z, *args):
        spare = torch.empty_like(z)  # held through the statistics
        stats = statistics(z, *args)
        del spare
        return stats

    monkeypatch.setattr(fused_head, "_statistics", one_more_tile)
    bigger = _fused_head_peak(run)
    assert bigger - measured == 64 * 2000 * 4  # one fp32 [c, R] tile
    assert abs(planned / bigger - 1) > FUSED_HEAD_TOLERANCE
    print(f"planned {planned}, measured {measured}, with one more tile {bigger} "
          f"({planned / bigger - 1:+.1%}); without the weight copies "
          f"{planned - memory.loss_terms(run)['weight_copies']}")


def test_the_fused_heads_chunk_and_config_are_the_trainers():
    """The default chunk is the loss's (a 128 MiB fp32 tile of this rank's vocab rows, at most
    an eighth of the micro-batch's tokens);
    ``--gift-head`` and ``--gift-head-chunk-tokens`` reach the plan, whose last stage counts
    the fused head's terms."""
    from megatron_gift.loss.fused_head import default_chunk_tokens

    for vocab, tp in ((152064, 2), (128256, 8), (300, 1), (1 << 30, 1)):
        run = dataclasses.replace(_run(TINY), vocab_size=vocab, tensor_parallel=tp,
                                  head="fused")
        assert memory.fused_head_chunk_tokens(run) == default_chunk_tokens(
            run.padded_vocab // tp, memory._tokens(run))
    logits = _run(QWEN_7B)
    fused = _run([*QWEN_7B, "--gift-head", "fused", "--gift-head-chunk-tokens", "300"])
    assert (logits.head, logits.head_chunk_tokens) == ("logits", None)
    assert (fused.head, fused.head_chunk_tokens) == ("fused", 300)
    assert memory.fused_head_chunk_tokens(fused) == 300
    assert memory.loss_terms(logits) == memory.logits_loss_terms(logits)
    assert memory.loss_terms(fused) == memory.fused_head_terms(fused)
    assert "logits" not in memory.loss_terms(fused)
    assert memory.plan_stage(fused, 0).bytes["loss_buffers"] == sum(
        memory.fused_head_terms(fused).values())


def test_the_plan_names_its_head(capsys):
    _, out, _ = _command(capsys, *QWEN_7B, "--json")
    head = json.loads(out)["head"]
    assert head["name"] == "logits" and head["chunk_tokens"] is None
    assert set(head["loss_buffers"]) == {"logits", "reference_logits", "saved", "workspace"}
    _, out, _ = _command(capsys, *QWEN_7B, "--gift-head", "fused", "--json")
    plan = json.loads(out)
    assert plan["head"]["name"] == "fused" and plan["head"]["chunk_tokens"] == 441
    assert sum(plan["head"]["loss_buffers"].values()) == plan["stages"][0]["bytes"]["loss_buffers"]
    _, out, _ = _command(capsys, *QWEN_7B, "--gift-head", "fused")
    assert re.search(r"^head\s+fused \(the logits 441 tokens at a time, default: a 128 MiB "
                     r"fp32 tile; never whole\)$", out, re.M)
    _, out, _ = _command(capsys, *QWEN_7B)
    assert re.search(r"^head\s+logits ", out, re.M)


# ---------------------------------------------------------------------------------------------
# LoRA GIFT: the plan of a frozen base with adapters and no reference model

# Llama-3.1-70B's adapters at rank 16 on the four linears, counted by hand per layer (A [r, in]
# and B [out, r], whole): QKV 8192 -> 10240, projection 8192 -> 8192, fc1 8192 -> 57344, fc2
# 28672 -> 8192.
LLAMA_70B_LORA_16 = 80 * 16 * (8192 + 10240 + 8192 + 8192 + 8192 + 57344 + 28672 + 8192)
LORA_70B = ["--config", os.path.join(RECIPES, "llama3.1-70b-gift.yaml"), "--lora-rank", "16",
            "--pipeline-model-parallel-size", "1", "--gift-head", "fused"]


def test_the_lora_plan_names_its_adapters_and_holds_no_reference(capsys):
    """Llama-3.1-70B with rank-16 adapters at TP8 on 8 GPUs: 175.6 M trained parameters, whose
    gradients and Adam state are all the plan holds of either (the base's 70.55 B none); no
    reference weights; the local layers; JSON and text name the adapters."""
    from megatron_gift.core import lora as engine_lora

    from megatron_gift.planning import lora

    assert lora.COLUMN_PARALLEL == engine_lora.COLUMN_PARALLEL
    code, out, _ = _command(capsys, *LORA_70B, "--recompute-granularity", "selective", "--json")
    assert code == 0
    plan = json.loads(out)
    parameters, stage = plan["parameters"], plan["stages"][0]
    assert parameters["student_trained"] == LLAMA_70B_LORA_16 == 175_636_480
    assert parameters["student_total"] == 70_553_706_496 + LLAMA_70B_LORA_16
    assert plan["lora"] == {"rank": 16, "target_modules": list(lora.TARGET_ORDER),
                            "dropout": 0.0, "trained_parameters": LLAMA_70B_LORA_16}
    trained = memory.stage_trained_parameters(memory.run_from_config(
        parse_config(LORA_70B), 8), 0)
    assert trained == 80 * 733_184  # a column A and a row B whole on every GPU, the rest / 8
    assert stage["bytes"]["gradients"] == 4 * trained  # fp32 grad buffer
    assert stage["bytes"]["optimizer"] == 12 * trained  # fp32 main weights, two moments
    assert stage["bytes"]["reference_weights"] == 0
    assert stage["bytes"]["student_weights"] == 2 * stage["parameters_per_gpu"]
    assert plan["stop"]["save_bytes"] == 14 * LLAMA_70B_LORA_16  # the adapters alone
    _, text, _ = _command(capsys, *LORA_70B, "--lora-target-modules", "linear_qkv,linear_fc2",
                          "--lora-dropout", "0.05")
    assert re.search(r"^lora\s+rank 16 on linear_qkv, linear_fc2, dropout 0.05: 0.071 B "
                     r"trained parameters", text, re.M)
    assert "LoRA GIFT (the reference is the base" in text
    assert "Megatron-Core's local layers (LoRA takes them)" in text
    _, out, _ = _command(capsys, *LLAMA_70B, "--json")
    full = json.loads(out)
    assert full["lora"] is None
    assert full["parameters"]["student_trained"] == full["parameters"]["student_total"]


def test_the_suggestion_searches_lora_runs():
    """LoRA 70B at TP8 on 8 GPUs at 8192 tokens: without recompute the local attention's
    scores of 80 layers do not fit; the suggestion is selective recompute (the least that
    fits on these GPUs), checked by planning it, and no cheaper layout fits."""
    run = memory.run_from_config(parse_config(LORA_70B), 8)
    assert run.layer_spec == "local" and run.lora_rank == 16
    result = memory.plan(run)
    assert not result.fits
    assert result.suggestion.startswith("--recompute-granularity selective (then ")
    assert result.suggested_run == dataclasses.replace(run, recompute_granularity="selective")
    assert memory.plan(result.suggested_run, suggest=False).fits
    cost = memory.suggestion_cost(run, result.suggested_run)
    for layout in memory.layouts(run):
        if memory.suggestion_cost(run, layout) < cost:
            assert not memory.plan(layout, suggest=False).fits, layout


def test_a_lora_step_computes_no_weight_gradient_for_the_base():
    """LoRA 70B: a step is 6 N FLOPs a token for the base (forward 2 N, backward 2 N: input
    gradients alone; the reference's forward 2 N) and 8 A for the adapters, plus the
    attention scores; a save writes the adapters' 14 bytes a parameter."""
    run = memory.run_from_config(parse_config(LORA_70B), 8)
    n, a = memory.total_parameters(run), memory.trained_parameters(run)
    tokens = 128 * 8192
    scores = 4 * 8192 * 64 * 128 * 80
    assert memory.step_flops(run) == tokens * (6 * (n - a) + 8 * a + 4 * scores)
    assert memory.checkpoint_bytes(run) == 14 * a


# ---------------------------------------------------------------------------------------------
# Megatron-LM's formula (megatron/training/theoretical_memory_usage.py), as an oracle written
# from its description: Korthikanti et al. 2022, Table 2; first pipeline stage only.


def megatron_lm_weights_and_optimizer(model, tp, pp, dp, distributed_optimizer):
    """Bytes per GPU of the most loaded shard: 18 B per parameter, 6 + 12/DP with the
    distributed optimizer; the vocab padded to a multiple of 128 x TP."""
    h, a, g, d, ffn, layers = (model[k] for k in ("h", "a", "g", "d", "ffn", "layers"))
    padded_vocab = -(-model["vocab"] // (128 * tp)) * (128 * tp)
    attention = 2 * h * h * (1 + g / a) * (d * a / h)
    layer = attention + 2 * h * ffn * 1.5 + 2 * h
    block = layers * layer + h
    embedding = h * padded_vocab
    shard = (block / pp + embedding) / tp
    if model["untied"] and pp == 1:
        shard += embedding / tp
    return shard * (6 + 12 / dp if distributed_optimizer else 18)


def megatron_lm_activations(model, tp, pp, seq, micro_batch, micro_batches, sp_selective):
    """Activation bytes of the first stage, without its output-layer term (PP > 1 only here).
    Returns ``(total, dropout_masks, mlp)``: the parts of the total that model the dropout
    masks (this project's dropout is 0 and keeps none) and the MLP's internals (GeLU: 4 ffn
    bytes a token; SwiGLU keeps more), which differ from what this project's layers keep."""
    h, ffn, layers = model["h"], model["ffn"], model["layers"]
    sbh = seq * micro_batch * h
    factor = min(1, micro_batches / pp)
    if sp_selective:
        per_layer, masks, mlp = sbh * (18 + 4 * ffn / h), 2 * sbh, 4 * seq * micro_batch * ffn
        total = per_layer * layers + 8 * seq * micro_batch * pp + sbh * pp
        return (total * factor / tp, (masks * layers + sbh * pp) * factor / tp,
                mlp * layers * factor / tp)
    per_layer = sbh * (10 + 24 / tp)  # 10: norms 4, masks 2, QKV and MLP inputs; 24/TP: rest
    masks, mlp = 2 * sbh, 16 * sbh / tp  # the MLP at ffn = 4h
    total = (per_layer * layers + 8 * seq * micro_batch * pp + sbh * pp) * factor * 1.05
    return total, (masks * layers + sbh * pp) * factor * 1.05, mlp * layers * factor * 1.05


def _model_of(run):
    return {"h": run.hidden_size, "a": run.num_attention_heads, "g": run.num_query_groups,
            "d": run.kv_channels, "ffn": run.ffn_hidden_size, "layers": run.num_layers,
            "vocab": run.vocab_size, "untied": run.untied}


STATIC_COMPARISONS = {
    "Qwen2.5-7B TP2, 18 B/param": (QWEN_7B, 2),
    "Qwen2.5-7B TP2 DP4, distributed optimizer": ([*QWEN_7B, "--use-distributed-optimizer"], 8),
    "Llama-3.1-70B TP8 PP4, 18 B/param": (LLAMA_70B, 32),
    "Llama-3.1-70B TP8 PP4 DP2, distributed optimizer": (
        [*LLAMA_70B, "--use-distributed-optimizer"], 64),
}


@pytest.mark.parametrize("name", sorted(STATIC_COMPARISONS))
def test_weights_gradients_and_optimizer_match_megatron_lm_within_5_percent(name):
    argv, gpus = STATIC_COMPARISONS[name]
    run = _run(argv, gpus)
    first = memory.plan_stage(run, 0).bytes
    ours = first["student_weights"] + first["gradients"] + first["optimizer"]
    theirs = megatron_lm_weights_and_optimizer(_model_of(run), run.tensor_parallel,
                                               run.pipeline_parallel, run.data_parallel,
                                               run.distributed_optimizer)
    assert abs(ours / theirs - 1) < 0.05, (name, ours, theirs)
    # Exact agreement up to the vocab padding (128 x TP there, lcm(128, TP) here) and Qwen's
    # QKV bias, which Megatron-LM's count leaves out.
    assert abs(ours / theirs - 1) < 0.005, (name, ours, theirs)


ACTIVATION_COMPARISONS = {
    "Llama-3.1-70B TP8 PP4 SP, 8 micro-batches": ([*LLAMA_70B, "--sequence-parallel"], 32),
    "Llama-3.1-70B TP8 PP4, 2 micro-batches": ([*LLAMA_70B, "--global-batch-size", "2"], 32),
    "Qwen2.5-7B TP2 PP2 SP, seq 8192": ([*QWEN_7B, "--sequence-parallel", "--seq-length", "8192",
                                         "--pipeline-model-parallel-size", "2"], 4),
}


@pytest.mark.parametrize("name", sorted(ACTIVATION_COMPARISONS))
def test_activations_match_megatron_lm_within_5_percent_where_both_model_the_same_thing(name):
    """The first stage with Transformer Engine's layers (flash attention: no s x s scores,
    which is what Megatron-LM's selective+SP formula assumes; without SP its 10 + 24/TP).
    Compared with multi-head attention (K and V as wide as Q, as Megatron-LM counts them),
    without Megatron-LM's dropout masks (dropout is 0 here) and without either MLP's
    internals (GeLU there; the fused SwiGLU here keeps three [s, b, ffn/TP] tensors, fc1's
    output and fc2's input, 6 ffn bytes a token against 4), and without the x1.05 Megatron-LM
    puts on the form without SP."""
    argv, gpus = ACTIVATION_COMPARISONS[name]
    run = _run(argv, gpus)
    mha = dataclasses.replace(run, num_query_groups=run.num_attention_heads)
    ours = memory.stage_activations(mha, 0)
    flights = memory.in_flight(mha, 0)
    layers = run.num_layers // run.pipeline_parallel
    seq, b, tp = run.seq_length, run.micro_batch_size, run.tensor_parallel
    our_mlp = flights * layers * 3 * 2 * seq * b * run.ffn_hidden_size / tp
    total, masks, mlp = megatron_lm_activations(
        _model_of(run), tp, run.pipeline_parallel, seq, b, run.micro_batches,
        sp_selective=run.sequence_parallel)
    fudge = 1.0 if run.sequence_parallel else 1.05
    same_ours, same_theirs = ours - our_mlp, (total - masks - mlp) / fudge
    assert abs(same_ours / same_theirs - 1) < 0.05, (name, same_ours, same_theirs)
    # The MLP is where they differ most: 6 ffn bytes a token here; 4 ffn there with SP and
    # selective recompute, 16 h (ffn taken as 4 h) without.
    theirs_per_token = 4 * run.ffn_hidden_size if run.sequence_parallel else 16 * run.hidden_size
    assert our_mlp / (mlp / fudge) == pytest.approx(6 * run.ffn_hidden_size / theirs_per_token)


# ---------------------------------------------------------------------------------------------
# FP8: what Transformer Engine keeps (derived from its source; not measured without a GPU)

FP8_8B = os.path.join(RECIPES, "llama3.1-8b-gift-fp8.yaml")
BF16_8B = os.path.join(RECIPES, "llama3.1-8b-gift.yaml")
# Llama-3.1-8B at TP2: one layer's GEMM weights on one GPU, QKV (32 + 2 x 8 heads of 128) x h,
# the output projection h x h, fc1 and fc2 3 x ffn x h.
GEMM_8B_TP2 = ((32 + 2 * 8) * 128 * 4096 + 4096 * 4096 + 3 * 14336 * 4096) // 2
# Tensorwise scaling: 4 GEMMs a layer x 5 quantizers x an fp32 scale and amax.
TENSORWISE_STATE = 4 * 5 * 2 * 4


def _fp8_and_bf16(**changes):
    """The FP8 8B recipe's run (with ``changes``) and the same run without FP8, stage 0."""
    fp8 = dataclasses.replace(memory.run_from_config(parse_config(["--config", FP8_8B]), 8),
                              **changes)
    bf16 = dataclasses.replace(fp8, fp8_recipe=None, fp8_param=False, reference_fp8=False,
                               reference_fp8_weights=False)
    return fp8, memory.plan_stage(fp8, 0).bytes, memory.plan_stage(bf16, 0).bytes


def test_the_fp8_recipe_plans_less_than_the_same_recipe_in_bf16():
    """llama3.1-8b-gift-fp8.yaml (tensorwise, --fp8-param-gather, reference bf16) against
    llama3.1-8b-gift.yaml: the student's GEMM weights take 1 byte instead of 2 and their
    transposes 1 byte in "FP8 state"; the one layer that full recompute re-creates saves FP8
    inputs (norm outputs and fc2's input 1 byte instead of 2, the projection's input an FP8
    copy beside flash attention's bf16 one); gradients, optimizer, reference unchanged."""
    fp8 = memory.run_from_config(parse_config(["--config", FP8_8B]), 8)
    bf16 = memory.run_from_config(parse_config(["--config", BF16_8B]), 8)
    assert bf16 == dataclasses.replace(fp8, fp8_recipe=None, fp8_param=False)
    assert (fp8.fp8_recipe, fp8.fp8_param, fp8.reference_fp8) == ("tensorwise", True, False)
    assert GEMM_8B_TP2 == 109_051_904
    a, b = memory.plan_stage(fp8, 0).bytes, memory.plan_stage(bf16, 0).bytes
    layers = 32
    assert b["student_weights"] - a["student_weights"] == layers * GEMM_8B_TP2
    assert a["fp8_state"] == layers * (GEMM_8B_TP2 + TENSORWISE_STATE) and b["fp8_state"] == 0
    for part in ("gradients", "optimizer", "reference_weights", "pipeline_buffers",
                 "loss_buffers"):
        assert a[part] == b[part], part
    tokens, rows = 2 * 8192, 8192  # a micro-batch; its sequence-parallel share at TP2
    saved = (2 * rows * 4096 * (2 - 1)  # both norms' outputs
             - tokens * 32 * 128 // 2 * 1  # the projection's FP8 copy of its input
             + tokens * 14336 // 2 * (2 - 1))  # fc2's input
    assert saved == 150_994_944
    assert b["activations"] - a["activations"] == saved
    assert b["total"] - a["total"] == saved - layers * TENSORWISE_STATE > 0
    gib = (a["total"] / GIB, b["total"] / GIB)
    assert gib == (pytest.approx(52.45, abs=0.01), pytest.approx(52.59, abs=0.01)), gib


@pytest.mark.parametrize("changes,weights,state", [
    # FP8 without FP8 weights: bf16 weights, and TE's cached FP8 copy with its transpose.
    ({"fp8_param": False}, 0, 2 * GEMM_8B_TP2 + TENSORWISE_STATE),
    # Delayed scaling: 5 slots x (an amax history of 1024, the scale, the reduction's amax).
    ({"fp8_param": False, "fp8_recipe": "delayed", "fp8_amax_history_len": 1024}, 0,
     2 * GEMM_8B_TP2 + 4 * 5 * (1024 + 2) * 4),
    # A reference in FP8 too (no_grad: its cached copy has no transpose) and its scaling state.
    ({"reference_fp8": True}, 0, 2 * GEMM_8B_TP2 + 2 * TENSORWISE_STATE),
    # ... with FP8 weights: 1 byte a GEMM weight instead of 2; the transpose TE built them with.
    ({"reference_fp8": True, "reference_fp8_weights": True}, GEMM_8B_TP2,
     2 * GEMM_8B_TP2 + 2 * TENSORWISE_STATE),
    # MXFP8 (Blackwell): an 8-bit scale per 32 elements of the data and of its columnwise copy.
    ({"fp8_param": False, "fp8_recipe": "mxfp8"}, 0, 2 * GEMM_8B_TP2 * (1 + 1 / 32)),
])
def test_fp8_bytes_per_gemm_weight_and_layer(changes, weights, state):
    """Per layer on one GPU: the reference's weights saved by FP8 and the FP8 state."""
    fp8, a, b = _fp8_and_bf16(**changes)
    student = 0 if not fp8.fp8_param else GEMM_8B_TP2
    assert b["student_weights"] - a["student_weights"] == 32 * student
    assert b["reference_weights"] - a["reference_weights"] == 32 * weights
    assert a["fp8_state"] == math.ceil(32 * state)


def test_bf16_edge_layers_keep_bf16_weights_and_activations():
    """--first-last-layers-bf16 (1 and 1): 30 FP8 layers; without recompute every layer's
    activations count, the two bf16 ones at their bf16 size."""
    fp8, a, b = _fp8_and_bf16(fp8_bf16_layers=(1, 1), recompute_granularity=None,
                              recompute_method=None, recompute_num_layers=None)
    assert [memory.is_fp8_layer(fp8, i) for i in (0, 1, 30, 31)] == [False, True, True, False]
    assert b["student_weights"] - a["student_weights"] == 30 * GEMM_8B_TP2
    assert a["fp8_state"] == 30 * (GEMM_8B_TP2 + TENSORWISE_STATE)
    per_layer = 150_994_944
    assert b["activations"] - a["activations"] == 30 * per_layer


# ---------------------------------------------------------------------------------------------
# Recipes


def _run_recipes():
    """Every recipe at the top of examples/recipes (shared/ holds their common parents)."""
    return sorted(glob.glob(os.path.join(RECIPES, "*.yaml")))


def _gpus_of(path, config):
    """The GPU count a recipe states: the ``--num-gpus N`` of its plan command, else its
    ``torchrun --nproc-per-node N``."""
    text = open(path).read()
    for pattern in (r"megatron_gift\.plan .*--num-gpus (\d+)", r"--nproc-per-node (\d+)"):
        found = re.search(pattern, text)
        if found:
            return int(found.group(1))
    raise AssertionError(f"{path} states no GPU count")


def _bundled_vocab() -> int:
    """Tokens of the bundled tokenizer (the CPU recipes' vocab)."""
    from megatron_gift.demo.synthetic import TOKENIZER_DIR

    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json")) as f:
        bundled = json.load(f)
    vocab = bundled["model"]["vocab"]
    return len(vocab) + len(
        [t for t in bundled.get("added_tokens", []) if t["content"] not in vocab])


def _recipe_run(path):
    """``(config, GPUs, Run)`` of the recipe at ``path`` on the GPU count it states."""
    config = parse_config(["--config", path])
    gpus = _gpus_of(path, config)
    if config.model.vocab_size is None:  # a CPU recipe on the bundled tokenizer
        config.model.vocab_size = _bundled_vocab()
    return config, gpus, memory.run_from_config(config, gpus)


# Nodes of 8 GPUs a GIFT recipe may state, by the model size in its name (the first that
# matches: a LoRA 70B on one node).
RECIPE_NODES = {"-70b-lora-": (1,), "-7b-": (1,), "-8b-": (1,), "-30b-a3b-": (2,),
                "-70b-": (4, 8), "-72b-": (4, 8)}


def test_every_shipped_recipe_validates_and_fits_by_its_own_planner():
    names = [os.path.basename(p) for p in _run_recipes()]
    for gift in ("qwen2.5-7b-gift.yaml", "llama3.1-8b-gift.yaml", "llama3.1-70b-gift.yaml",
                 "qwen2.5-72b-gift.yaml", "qwen3-8b-gift.yaml", "qwen3-30b-a3b-gift.yaml",
                 "llama3.1-70b-lora-gift.yaml"):
        assert gift in names
    for path in _run_recipes():
        config, gpus, run = _recipe_run(path)
        result = memory.plan(run)
        assert result.fits, (path, result.worst.bytes["total"] / GIB, result.suggestion)
        if os.path.basename(path).endswith("-gift.yaml"):
            assert config.training.bf16 and config.gift.beta == 20.0
            assert config.gift.smooth_lambda == (0.01 if "llama" in path else 0.0)
            nodes = next(n for size, n in RECIPE_NODES.items() if size in path)
            assert gpus in [8 * n for n in nodes], path
            assert config.checkpoint.pretrained_checkpoint.startswith("/models/")
            assert (config.lora.rank is not None) == ("-lora-" in path), path


def _launch_lines(path) -> list[str]:
    """The torchrun commands of a recipe's header comment, continuation lines joined."""
    header = []
    for line in open(path).read().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    text = "\n".join(header).replace("\\\n", " ")
    return [line for line in text.splitlines() if line.startswith("torchrun ")]


def test_every_recipes_launch_line_gives_a_stopping_run_the_time_to_save():
    """A SIGTERM lets the step in progress finish, then the run saves; torchrun kills its
    workers after --shutdown-timeout (default 30 s). Every torchrun line of a recipe's header
    gives at least what the planner asks for: twice its estimate of a step and a save, and at
    least 600 s for a 70B-class model, 300 s from 1B parameters, 60 s below."""
    launched = 0
    for path in _run_recipes():
        _, _, run = _recipe_run(path)
        for line in _launch_lines(path):
            launched += 1
            found = re.search(r"--shutdown-timeout (\d+)", line)
            assert found, f"{os.path.basename(path)}: {line}"
            wanted = memory.shutdown_timeout(run)
            assert int(found.group(1)) >= wanted, (path, int(found.group(1)), wanted)
            step, save = memory.stop_seconds(run)
            assert wanted >= 2 * (step + save)
            billions = memory.total_parameters(run) / 1e9
            assert wanted >= (600 if billions >= 70 else 300 if billions >= 1 else 60)
    assert launched == len(_run_recipes())  # every recipe shows its launch


def test_the_stop_estimate_counts_a_step_and_a_save():
    """Llama-3.1-70B's recipe on 64 GPUs: the save writes 14 bytes a parameter (bf16 weights,
    fp32 main weights, Adam's two moments); the step is 8 N FLOPs a token (the student's
    forward and backward, the reference's forward) plus the attention scores."""
    config = parse_config(["--config", os.path.join(RECIPES, "llama3.1-70b-gift.yaml")])
    run = memory.run_from_config(config, 64)
    n = memory.total_parameters(run)
    assert memory.checkpoint_bytes(run) == 14 * n
    tokens = 128 * 8192
    scores = 4 * 8192 * 64 * 128 * 80
    assert memory.step_flops(run) == tokens * (8 * n + 4 * scores)
    step, save = memory.stop_seconds(run)
    assert save == 14 * n / (8 * memory.ASSUMED_NODE_WRITE_BYTES)
    assert step == memory.step_flops(run) / (64 * memory.ASSUMED_GPU_FLOPS)
    assert memory.shutdown_timeout(run) == 600  # the 70B floor above twice ~105 s
    sft = dataclasses.replace(run, reference=False, recompute_granularity="full",
                              recompute_method="uniform", recompute_num_layers=1)
    assert memory.step_flops(sft) == tokens * (8 * n + 4 * scores)  # recompute for reference


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_the_architecture_is_read_from_a_hugging_face_base_as_training_reads_it(
        tmp_path, capsys, family):
    """``--pretrained-checkpoint HF_DIR`` gives the planner the base's architecture (counted
    as transformers counts its parameters: Qwen3's q/k norms and head dim, Qwen3-MoE's router,
    experts and dense layer included); a model flag that contradicts it is refused."""
    from transformers import AutoModelForCausalLM

    from test_hf_conversion import make_hf_model

    make_hf_model(tmp_path / "hf", family)
    code, out, _ = _command(capsys, "--pretrained-checkpoint", str(tmp_path / "hf"),
                            "--seq-length", "32", "--json")
    assert code == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    expected = sum(p.numel() for p in hf.parameters())
    planned = json.loads(out)["parameters"]["student_total"]
    padding = (-hf.config.vocab_size % 128) * hf.config.hidden_size  # the vocab padded to 128
    assert planned == expected + padding * (1 if hf.config.tie_word_embeddings else 2)
    code, _, err = _command(capsys, "--pretrained-checkpoint", str(tmp_path / "hf"),
                            "--num-layers", "3")
    assert code == 2 and "model.num_layers=3 (--num-layers) contradicts the base model's 2" in err
