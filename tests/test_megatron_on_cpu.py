"""Megatron-Core on CPU through megatron_gift.platform.cpu: TP, PP, TP x PP and interleaved PP schedules
of a tiny GPT, with the GIFT loss on the last stage, give the single-process losses and grads."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from support.parallel_harness import (
    causal_mask, full_tensor, gather_full_grads, model_parallel, run_distributed, set_full_weights,
    shard, tiny_gpt, tiny_gpt_config,
)

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES, BETA = 64, 12, 2, 4, 5.0


def _microbatch(index):
    g = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
    labels[:, :3] = -100  # a "prompt" without loss
    return {
        "tokens": tokens, "labels": labels,
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
        "attention_mask": causal_mask(MICRO_BATCH, SEQ),
        "ref_logits": 3 * full_tensor(f"ref{index}", (MICRO_BATCH, SEQ, VOCAB)),
    }


def _run_schedule(tp, pp, vpp, out_path):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gift.loss import vocab_parallel_gift_loss

    with model_parallel(tp, pp, vpp):
        config = tiny_gpt_config(virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=False)
        chunks = [tiny_gpt(config, VOCAB, SEQ, vp_stage=k if vpp else None)
                  for k in range(vpp or 1)]
        set_full_weights(chunks)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

            def loss_func(output):
                ref = shard(batch["ref_logits"], -1, 1, tp_size, tp_rank)
                loss = vocab_parallel_gift_loss(output, ref, batch["labels"], beta=BETA)
                tokens = (batch["labels"] != -100).sum()
                return loss.sum(), tokens, {"loss": loss.detach().sum() / tokens}

            return logits, loss_func

        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([_microbatch(i) for i in range(MICRO_BATCHES)])
                           for _ in chunks] if vpp else
            iter([_microbatch(i) for i in range(MICRO_BATCHES)]),
            model=chunks, num_microbatches=MICRO_BATCHES, seq_length=SEQ,
            micro_batch_size=MICRO_BATCH, forward_only=False,
        )
        grads = gather_full_grads(chunks)
        losses = [None] * dist.get_world_size()
        dist.all_gather_object(losses, [float(r["loss"]) for r in reports])
        if dist.get_rank() == 0:
            torch.save({"losses": [x for x in losses if x], "grads": grads}, out_path)


def _schedule_result(tmp_path, tp, pp, vpp=None):
    out = tmp_path / f"tp{tp}_pp{pp}_vpp{vpp}.pt"
    run_distributed(tp * pp, _run_schedule, tp, pp, vpp, str(out))
    return torch.load(out)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return _schedule_result(tmp_path_factory.mktemp("tp1"), 1, 1)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)])
def test_parallel_layout_matches_single_process(single_process, tmp_path, tp, pp, vpp):
    result = _schedule_result(tmp_path, tp, pp, vpp)
    # Every stage's ranks report the same losses; one copy per last-stage rank.
    expected = single_process["losses"][0]
    assert all(len(x) == MICRO_BATCHES for x in result["losses"])
    for losses in result["losses"]:
        # fp32 with a different reduction order over TP shards: ~1e-6 relative.
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert result["grads"].keys() == single_process["grads"].keys()
    for name, grad in single_process["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _python(code):
    """``code`` in a fresh interpreter (these tests are about what an import does)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.system
def test_import_does_not_patch_torch():
    result = _python(
        "import torch, megatron_gift, megatron_gift.loss, megatron_gift.platform.cpu\n"
        "try:\n    torch.cuda.current_device()\nexcept Exception:\n    print('untouched')\n"
    )
    assert "untouched" in result.stdout, result.stderr


@pytest.mark.system
def test_no_patch_where_cuda_is_available():
    result = _python(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import megatron_gift.platform.cpu as cpu; original = torch.cuda.synchronize\n"
        "print(cpu.enable_cpu_megatron(), torch.cuda.synchronize is original)\n"
    )
    assert result.stdout.split() == ["[]", "True"], result.stderr


@pytest.mark.system
def test_refuses_unsupported_megatron_core():
    result = _python(
        "from megatron.core import package_info; package_info.__version__ = '0.20.1'\n"
        "import megatron_gift.platform.cpu as cpu; cpu.enable_cpu_megatron()\n"
    )
    assert result.returncode != 0
    assert "0.20.1" in result.stderr and "0.19" in result.stderr


@pytest.mark.system
def test_patches_are_applied_once():
    result = _python(
        "import torch, megatron_gift.platform.cpu as cpu\n"
        "a = cpu.enable_cpu_megatron(); f = torch.cuda.current_device; b = cpu.enable_cpu_megatron()\n"
        "print(a == b, f is torch.cuda.current_device, torch.cuda.current_device())\n"
    )
    assert result.stdout.split() == ["True", "True", "cpu"], result.stderr
