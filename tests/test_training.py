"""The training engine: every parallel layout trains like one process, SFT is Megatron CE,
checkpoints resume exactly (also resharded, after SIGKILL, on SIGTERM), bad input fails fast."""

import json
import math
import os
import re
import signal
import sys
import time

import pytest
import torch

from megatron_gift.config import parse_config
from support.parallel_harness import TINY_MODEL, free_port, run_distributed, start_run, train_rank
from support.parallel_harness import train_on_ranks as _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(world, **sections):
    base = {
        "model": dict(TINY_MODEL),
        "data": {"train_path": world["demos"], "valid_path": world["valid"]},
        "training": {"train_iters": 3, "micro_batch_size": 2, "global_batch_size": 8,
                     "eval_interval": 1000, "eval_iters": 1},
        "optimizer": {"lr": 1e-2, "lr_decay_style": "constant", "clip_grad": 1.0},
        "gift": {"beta": 3.0},
        "checkpoint": {"pretrained_checkpoint": world["base"]},
        "logging": {"progress": False},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _losses(path):
    return [r["loss"] for r in _metrics(path) if "loss" in r]


@pytest.fixture(scope="module")
def world(tiny_world):
    """Synthetic data and the session's tiny base checkpoint."""
    return tiny_world


SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.5, "weight_decay": 0.0,
       "lr_decay_style": "constant", "clip_grad": 1.0}


def _layout_run(world, tmp, name, tp=1, pp=1, vpp=None, dp=1, parallel=(), training=(),
                gift=()):
    """Three SGD steps at a layout: ``(losses, model tensors after the last step)``.

    SGD, not Adam: its update is linear in the gradient, so the last-bit differences that a
    layout's reduction order makes stay last-bit differences in the weights; Adam divides by
    sqrt(v) + eps and turns them into lr-sized steps wherever a gradient is near zero.
    """
    out = tmp / name
    overrides = _overrides(world, parallel={
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp, **dict(parallel)},
        training=dict(training), optimizer=SGD, gift=dict(gift),
        checkpoint={"pretrained_checkpoint": world["base"], "save": str(out / "ckpt")},
        logging={"metrics_file": str(out / "metrics.jsonl"), "progress": False})
    _train(overrides, world_size=tp * pp * dp)
    return _losses(out / "metrics.jsonl"), _model_tensors(out / "ckpt" / "iter_0000003")


def _model_tensors(directory):
    """Full (unsharded) model tensors of a checkpoint, read in a one-rank world."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tensors = dist_checkpointing.load_plain_tensors(str(directory))
    finally:
        dist.destroy_process_group()
    return {k: v for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def _two_layouts_in_one_world(world, tmp):
    """Rank body: TP=2, then PP=2, trained one after the other in the harness's world."""
    import torch.distributed as dist

    from megatron_gift.engine.trainer import train

    for name, parallel in (("tp2", {"tensor_model_parallel_size": 2}),
                           ("pp2", {"pipeline_model_parallel_size": 2})):
        overrides = _overrides(world, parallel=parallel, optimizer=SGD,
                               checkpoint={"pretrained_checkpoint": world["base"],
                                           "save": os.path.join(tmp, name, "ckpt")},
                               logging={"metrics_file": os.path.join(tmp, name, "metrics.jsonl"),
                                        "progress": False})
        train(parse_config([], defaults=overrides))
        assert dist.is_initialized()  # the world train() joined is still there


def test_two_layouts_train_one_after_the_other_in_one_world(world, single_process_run, tmp_path):
    """The trainer joins the world it finds, sets its own model-parallel layout and leaves the
    world as it was: two layouts in one world give the losses of separate launches (the
    one-process launch, which every layout matches in the parity tests above)."""
    run_distributed(2, _two_layouts_in_one_world, world, str(tmp_path))
    expected, _ = single_process_run
    for name in ("tp2", "pp2"):
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / name / "metrics.jsonl")),
                                   torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def base_weights(world):
    return _model_tensors(os.path.join(world["base"], "iter_0000008"))


@pytest.fixture(scope="module")
def single_process_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp1")


@pytest.fixture(scope="module")
def single_process_run(world, single_process_dir):
    """The one-process run with the logits head, whatever the default head."""
    return _layout_run(world, single_process_dir, "tp1", gift={"head": "logits"})


def _evaluations(path) -> dict:
    """The last evaluation's metrics in a metrics file."""
    return {k: v for k, v in [r for r in _metrics(path) if "valid_ce" in r][-1].items()
            if k.startswith("valid_")}


# fp32; only the order of reductions differs between layouts (TP shards, pipeline stages).
UPDATE_RTOL = 1e-4  # of each tensor's largest update; reduction-order noise measures <= 6.3e-7


def assert_same_training(losses, weights, expected_losses, expected_weights, base):
    """Losses within 1e-5 and, per tensor, the update (trained - base) within UPDATE_RTOL of
    the largest update of that tensor in the one-process run."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5,
                               atol=1e-6)
    assert weights.keys() == expected_weights.keys() and len(weights) >= 9
    for key, value in expected_weights.items():
        expected_update = value - base[key]
        scale = float(expected_update.abs().max())
        assert scale > 0, f"{key} did not train"
        torch.testing.assert_close(weights[key] - base[key], expected_update, rtol=0,
                                   atol=UPDATE_RTOL * scale, msg=key)


@pytest.mark.parametrize("tp,pp,vpp,dp", [(2, 1, None, 1), (1, 2, None, 1), (2, 2, None, 1),
                                         (1, 2, 2, 1), (1, 1, None, 2)])
def test_layouts_train_like_one_process(world, single_process_run, base_weights, tmp_path,
                                        tp, pp, vpp, dp):
    losses, weights = _layout_run(world, tmp_path, f"tp{tp}pp{pp}vpp{vpp}dp{dp}", tp, pp, vpp, dp)
    assert_same_training(losses, weights, *single_process_run, base_weights)


@pytest.mark.parametrize("tp,pp,vpp,dp,chunk,parallel,training", [
    (1, 1, None, 1, 5, {}, {}), (2, 2, None, 1, 3, {}, {}),
    (2, 1, None, 1, 5, {"sequence_parallel": True}, {}),
    (2, 2, None, 1, None, {"sequence_parallel": True}, {}), (1, 2, 2, 1, 4, {}, {}),
    (1, 1, None, 2, 3, {}, {}),
    (1, 1, None, 1, 6, {}, {"recompute_granularity": "full", "recompute_method": "uniform",
                            "recompute_num_layers": 1}),
], ids=["tp1", "tp2-pp2", "tp2-sp", "tp2-pp2-sp", "vpp", "dp2", "full-recompute"])
def test_the_fused_head_trains_like_the_logits_head(world, single_process_run, single_process_dir,
                                                    base_weights, tmp_path, tp, pp, vpp, dp,
                                                    chunk, parallel, training):
    """--gift-head fused (hidden states and output weights into the loss, logits never held
    beyond a chunk) gives the losses and weight updates of the logits head at TP=1, and its
    evaluation the same valid_ce and valid_accuracy."""
    losses, weights = _layout_run(world, tmp_path, "fused", tp, pp, vpp, dp, parallel.items(),
                                  training.items(), gift={"head": "fused",
                                                          "head_chunk_tokens": chunk})
    assert_same_training(losses, weights, *single_process_run, base_weights)
    evaluation = _evaluations(tmp_path / "fused" / "metrics.jsonl")
    expected = _evaluations(single_process_dir / "tp1" / "metrics.jsonl")
    assert evaluation.keys() == expected.keys() == {"valid_ce", "valid_accuracy"}
    for key, value in expected.items():
        assert evaluation[key] == pytest.approx(value, rel=1e-5), key


SP = {"sequence_parallel": True}
FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform",
                  "recompute_num_layers": 1}


@pytest.mark.parametrize("tp,pp,dp,parallel,training", [
    (2, 1, 1, SP, {}), (2, 2, 1, SP, {}), (1, 1, 1, {}, FULL_RECOMPUTE),
    (2, 1, 1, SP, {"recompute_granularity": "selective"}),
    (1, 2, 1, {}, {**FULL_RECOMPUTE, "recompute_method": "block", "recompute_num_layers": 2}),
    (1, 1, 2, {"overlap_grad_reduce": True}, {}),
], ids=["tp2-sp", "tp2-pp2-sp", "full-recompute", "tp2-sp-selective-recompute",
        "pp2-block-recompute", "dp2-overlap-grad-reduce"])
def test_memory_features_train_like_one_process(world, single_process_run, base_weights, tmp_path,
                                                tp, pp, dp, parallel, training):
    """Sequence parallelism (student and reference), recompute (student) and the overlapped
    gradient reduce change memory and communication, not the numbers."""
    losses, weights = _layout_run(world, tmp_path, "run", tp, pp, None, dp, parallel.items(),
                                  training.items())
    assert_same_training(losses, weights, *single_process_run, base_weights)


@pytest.mark.parametrize("first,then", [
    ({"parallel": {"tensor_model_parallel_size": 2, **SP}, "training": FULL_RECOMPUTE}, {}),
    ({}, {"parallel": {"tensor_model_parallel_size": 2, **SP},
          "training": {"recompute_granularity": "selective"}}),
], ids=["saved-with-sp-and-recompute", "resumed-with-sp-and-recompute"])
def test_sp_and_recompute_checkpoints_resume_without_them_and_back(world, single_process_run,
                                                                   tmp_path, first, then):
    ckpt = str(tmp_path / "ckpt")
    tp_of = lambda sections: sections.get("parallel", {}).get("tensor_model_parallel_size", 1)
    _train(_overrides(world, training={"train_iters": 2, **first.get("training", {})},
                      checkpoint={"pretrained_checkpoint": world["base"], "save": ckpt},
                      optimizer=SGD, parallel=first.get("parallel", {})), world_size=tp_of(first))
    metrics = tmp_path / "resumed.jsonl"
    _train(_overrides(world, checkpoint={"load": ckpt, "save": ckpt},
                      optimizer={**SGD, "override_opt_param_scheduler": True},  # 2 -> 3 iterations
                      parallel=then.get("parallel", {}), training=then.get("training", {}),
                      logging={"metrics_file": str(metrics), "progress": False}),
           world_size=tp_of(then))
    resumed = [r for r in _metrics(metrics) if "loss" in r]
    assert [r["iteration"] for r in resumed] == [3]
    torch.testing.assert_close(resumed[0]["loss"], single_process_run[0][2], rtol=1e-5, atol=1e-6)


def test_the_layout_check_catches_a_wrong_qkv_split(single_process_run, base_weights):
    """A sharding bug that sends one query group's update to another group's rows (as a wrong
    QKV split or TP rank order does) fails the comparison; the one-process run passes it."""
    losses, weights = single_process_run
    assert_same_training(losses, weights, losses, weights, base_weights)
    key = next(k for k in weights if k.endswith("layers.self_attention.linear_qkv.weight"))
    base = base_weights[key]
    update = weights[key] - base
    groups = TINY_MODEL["num_query_groups"]
    rows_per_group = update.shape[-2] // groups
    swapped = update.unflatten(-2, (groups, rows_per_group)).flip(-3).flatten(-3, -2)
    mutated = {**weights, key: base + swapped}
    with pytest.raises(AssertionError, match="linear_qkv"):
        assert_same_training(losses, mutated, losses, weights, base_weights)


def _reference_stays_frozen(overrides):
    from megatron.core import parallel_state

    from megatron_gift.engine import trainer as training
    from megatron_gift.platform.distributed import init_distributed

    from megatron_gift.engine.run_spec import resolve

    spec = resolve(parse_config([], defaults=overrides))
    init_distributed()
    try:
        job = training.setup(spec)
        before = [{n: p.detach().clone() for n, p in c.reference.named_parameters()}
                  for c in job.chunks]
        training.run(job)
        calls = []
        hooks = [c.reference.register_forward_hook(lambda *_: calls.append(1)) for c in job.chunks]
        evaluation = training._evaluate(job)
        for hook in hooks:
            hook.remove()
        assert calls == [] and math.isfinite(evaluation["valid_ce"])  # evaluation skips it
        assert all(c.runs_reference for c in job.chunks)  # and training runs it again
        for chunk, saved in zip(job.chunks, before):
            assert not chunk.reference.training
            for name, param in chunk.reference.named_parameters():
                assert torch.equal(param, saved[name]), name
                assert param.grad is None and not param.requires_grad, name
        changed = [not torch.equal(p, q) for p, q in zip(
            job.chunks[0].reference.parameters(), job.chunks[0].student.module.parameters())]
        assert any(changed)  # the student did move away from the reference
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_reference_is_bit_identical_after_training(world):
    run_distributed(2, _reference_stays_frozen,
                    _overrides(world, parallel={"pipeline_model_parallel_size": 2}),
                    initialize=False)


def _sft_with_megatron_ce(overrides, use_megatron_ce):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gift.loss import GiftTokenStats, objectives

    if use_megatron_ce:
        def megatron_ce(logits, reference_logits, labels, vocab_size, **kwargs):
            assert reference_logits is None  # beta = inf builds and runs no reference
            # The vocab padding takes no part: Megatron's CE sees it at -inf.
            shard = logits.size(-1)
            columns = torch.arange(shard) + parallel_state.get_tensor_model_parallel_rank() * shard
            logits = logits.masked_fill(columns >= vocab_size, -torch.inf)
            loss = vocab_parallel_cross_entropy(logits, labels.clamp(min=0)) * (labels != -100)
            calls.append(1)
            if not kwargs.get("return_stats"):
                return loss
            return loss, GiftTokenStats(*[torch.zeros_like(loss)] * 3)
        objectives.vocab_parallel_gift_loss = megatron_ce  # the training step's loss
    calls = []
    train_rank([], overrides)
    assert bool(calls) == use_megatron_ce  # the stand-in did run the steps


def test_infinite_beta_is_megatron_cross_entropy_sft_without_reference(world, tmp_path):
    """SFT (beta = inf) trains as with Megatron-Core's cross-entropy, through the logits head
    and through the fused head (a cross-entropy that makes no logits)."""
    losses = {}
    for head, use_megatron_ce in (("logits", False), ("logits", True), ("fused", False)):
        metrics = tmp_path / f"{head}-{use_megatron_ce}.jsonl"
        overrides = _overrides(
            world, gift={"beta": math.inf, "reference_load": str(tmp_path / "does-not-exist"),
                         "head": head},
            parallel={"tensor_model_parallel_size": 2},
            logging={"metrics_file": str(metrics), "progress": False})
        run_distributed(2, _sft_with_megatron_ce, overrides, use_megatron_ce, initialize=False)
        losses[head, use_megatron_ce] = torch.tensor(_losses(metrics))
    assert len(losses["logits", True]) == 3
    for ours in (losses["logits", False], losses["fused", False]):
        torch.testing.assert_close(ours, losses["logits", True], rtol=1e-6, atol=1e-6)


def test_save_at_tp2_resume_at_pp2_continues_exactly(world, single_process_run, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _train(_overrides(world, training={"train_iters": 2}, checkpoint={
        "pretrained_checkpoint": world["base"], "save": ckpt}, optimizer=SGD,
        parallel={"tensor_model_parallel_size": 2}), world_size=2)
    metrics = tmp_path / "resumed.jsonl"
    _train(_overrides(world, checkpoint={"load": ckpt, "save": ckpt},
                      optimizer={**SGD, "override_opt_param_scheduler": True},  # 2 -> 3 iterations
                      parallel={"pipeline_model_parallel_size": 2},
                      logging={"metrics_file": str(metrics), "progress": False}), world_size=2)
    resumed = [r for r in _metrics(metrics) if "loss" in r]
    assert [r["iteration"] for r in resumed] == [3]
    torch.testing.assert_close(resumed[0]["loss"], single_process_run[0][2], rtol=1e-5, atol=1e-6)


def _launch(world, tmp_path, name, *flags, recipe=True):
    overrides = _overrides(world)
    args = [sys.executable, os.path.join(REPO, "examples", "pretrain_gift.py"),
            *(["--config", str(tmp_path / "recipe.yaml")] if recipe else []), *flags]
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(overrides), tmp_path / "recipe.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return start_run(args, tmp_path / f"{name}.log", env=env)


def _wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.system  # the launcher, as a program
def test_sigkill_resumes_from_last_checkpoint_on_the_same_curve(world, tmp_path):
    flags = ["--train-iters", "30", "--save-interval", "5", "--lr-decay-style", "cosine"]
    straight = _launch(world, tmp_path, "straight", *flags, "--metrics-file",
                       str(tmp_path / "straight.jsonl"))
    assert straight.wait(timeout=300) == 0
    ckpt = str(tmp_path / "ckpt")
    metrics = str(tmp_path / "killed.jsonl")
    killed = _launch(world, tmp_path, "killed", *flags, "--save", ckpt, "--load", ckpt,
                     "--metrics-file", metrics)
    tracker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    _wait_for(lambda: os.path.exists(tracker) and int(open(tracker).read() or 0) >= 5, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed_from = int(open(tracker).read())
    assert resumed_from < 30
    resumed = _launch(world, tmp_path, "resumed", *flags, "--save", ckpt, "--load", ckpt,
                      "--metrics-file", metrics)
    assert resumed.wait(timeout=300) == 0
    expected = {r["iteration"]: r["loss"] for r in _metrics(tmp_path / "straight.jsonl")
                if "loss" in r}
    records = _metrics(metrics)
    # the iterations the killed run logged after its last checkpoint were dropped on resume
    assert [r["iteration"] for r in records if "loss" in r] == list(range(1, 31))
    after = [r for r in records if "loss" in r][-(30 - resumed_from):]
    assert [r["iteration"] for r in after] == list(range(resumed_from + 1, 31))
    for record in after:
        assert record["loss"] == pytest.approx(expected[record["iteration"]], rel=1e-6, abs=1e-7)


@pytest.mark.system  # the launcher, as a program
def test_sigterm_saves_then_exits_cleanly(world, tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    process = _launch(world, tmp_path, "sigterm", "--train-iters", "100000", "--save", ckpt,
                      "--metrics-file", metrics)
    _wait_for(lambda: os.path.exists(metrics) and len(_losses(metrics)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    saved = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    assert saved >= 3 and saved == _metrics(metrics)[-1]["iteration"] < 100000
    assert os.path.isfile(os.path.join(ckpt, f"iter_{saved:07d}", "metadata.json"))


def test_distributed_optimizer_without_cuda_is_refused_up_front(world, tmp_path):
    from megatron_gift.engine.trainer import train

    config = parse_config(["--use-distributed-optimizer"], defaults=_overrides(world))
    with pytest.raises(ValueError, match="use_distributed_optimizer needs CUDA"):
        train(config)


def test_triton_loss_without_cuda_is_refused_up_front(world, monkeypatch):
    from megatron_gift.engine.trainer import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = parse_config(["--gift-loss-implementation", "triton"], defaults=_overrides(world))
    with pytest.raises(ValueError, match="gift.loss_implementation=triton cannot run here: "
                                         "tensors are on cpu, and the Triton kernels need CUDA"):
        train(config)


def test_world_size_not_divisible_fails_before_any_work(world, tmp_path, monkeypatch):
    from megatron_gift.engine.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "3")
    config = parse_config([], defaults=_overrides(world, parallel={
        "tensor_model_parallel_size": 2}, checkpoint={"save": str(tmp_path / "ckpt")}))
    with pytest.raises(ValueError, match="world size 3 is not divisible by tensor x pipeline x context"):
        train(config)
    assert not (tmp_path / "ckpt").exists()


def test_reference_with_other_architecture_is_rejected(world, tmp_path):
    overrides = _overrides(world, checkpoint={"pretrained_checkpoint": None,
                                              "save": str(tmp_path / "ckpt")},
                           gift={"reference_load": world["base"]},
                           model={**TINY_MODEL, "hidden_size": 48, "ffn_hidden_size": 96})
    with pytest.raises(Exception, match="does not match the model: hidden_size: checkpoint 32 vs "
                                        "run 48, ffn_hidden_size: checkpoint 64 vs run 96"):
        _train(overrides)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.system  # the launcher, as a program
def test_load_alone_continues_the_saved_run(world, tmp_path):
    """``--load DIR`` with no recipe and no data continues the run saved there, with its data,
    model and reference, into its own metrics file, and says which keys the command line
    changed."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "ckpt" / "metrics.jsonl"
    first = _launch(world, tmp_path, "first", "--train-iters", "2", "--save", str(ckpt))
    assert first.wait(timeout=300) == 0
    os.remove(tmp_path / "recipe.yaml")  # nothing but the checkpoint describes the run now
    second = _launch(world, tmp_path, "second", "--load", str(ckpt), "--train-iters", "3",
                     "--override-opt-param-scheduler", recipe=False)
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"continuing the run saved in {ckpt}; changed from it: training.train_iters, " \
           "optimizer.override_opt_param_scheduler" in log
    assert "resuming from" in log and "runs/default" not in log
    assert [r["iteration"] for r in _metrics(metrics) if "loss" in r] == [1, 2, 3]
    assert (ckpt / "iter_0000003").is_dir()


def test_a_changed_schedule_is_refused_unless_overridden_and_then_applies(world, tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), tmp_path / "metrics.jsonl"
    schedule = {"lr": 1e-2, "min_lr": 0.0, "lr_decay_style": "linear"}
    _train(_overrides(world, training={"train_iters": 4}, optimizer=schedule,
                      checkpoint={"pretrained_checkpoint": world["base"], "save": ckpt}))
    longer = _overrides(world, training={"train_iters": 8}, optimizer={**schedule, "lr": 5e-3},
                        checkpoint={"load": ckpt, "save": ckpt},
                        logging={"metrics_file": str(metrics), "progress": False})
    from megatron_gift.errors import UserError

    with pytest.raises(Exception, match=re.escape(
            "changed schedule (optimizer.lr 0.01 -> 0.005; training.train_iters 4 -> 8): pass "
            "--override-opt-param-scheduler")) as refused:
        _train(longer)
    assert "UserError" in str(refused.value) or isinstance(refused.value, UserError)
    longer["optimizer"]["override_opt_param_scheduler"] = True
    _train(longer)
    lrs = {r["iteration"]: r["lr"] for r in _metrics(metrics) if "loss" in r}
    assert sorted(lrs) == [5, 6, 7, 8]
    for iteration, lr in lrs.items():  # the new linear decay over 8 iterations, from 5e-3
        assert lr == pytest.approx(5e-3 * (1 - iteration / 8), abs=1e-12), iteration


def test_a_second_job_into_a_live_runs_save_directory_is_refused(world, tmp_path):
    from megatron_gift.platform.run_lock import LOCK_NAME, RunLock

    save = tmp_path / "ckpt"
    RunLock(str(save)).acquire()  # this test process plays the running job
    with pytest.raises(Exception, match=f"{save} is the save directory of a running job"):
        _train(_overrides(world, checkpoint={"pretrained_checkpoint": world["base"],
                                             "save": str(save)}))
    assert sorted(os.listdir(save)) == [LOCK_NAME]  # nothing written


def _record_initialization(overrides, path):
    """One rank: train with a spy on ``build_chunks`` that records, per model built, whether it
    is randomly initialised."""
    from megatron_gift.core import model

    seen, original = [], model.build_chunks

    def spy(config, tf_config, *args, **kwargs):
        seen.append(tf_config.perform_initialization)
        return original(config, tf_config, *args, **kwargs)

    model.build_chunks = spy
    train_rank([], overrides)
    with open(path, "w") as f:
        json.dump(seen, f)


@pytest.mark.parametrize("start", ["pretrained", "resumed", "from-scratch-sft"])
def test_only_models_that_load_no_weights_are_initialised(world, tmp_path, start):
    """The reference (always) and a student loaded from a checkpoint are built without random
    initialisation (minutes at 70B); a student trained from scratch is initialised."""
    if start == "resumed":
        _train(_overrides(world, checkpoint={"pretrained_checkpoint": world["base"],
                                             "save": str(tmp_path / "run")}))
    sections = {
        "pretrained": {},
        "resumed": {"checkpoint": {"pretrained_checkpoint": None, "load": str(tmp_path / "run"),
                                   "save": str(tmp_path / "run")},
                    "training": {"train_iters": 4},
                    "optimizer": {"override_opt_param_scheduler": True}},
        "from-scratch-sft": {"checkpoint": {"pretrained_checkpoint": None},
                             "gift": {"beta": float("inf")}},
    }[start]
    overrides = _overrides(world, **sections)
    if start == "resumed":
        overrides["gift"] = {"beta": 3.0, "reference_load": world["base"]}
    run_distributed(1, _record_initialization, overrides, str(tmp_path / "seen.json"),
                    initialize=False)
    expected = {"pretrained": [False, False], "resumed": [False, False],
                "from-scratch-sft": [True]}[start]
    assert json.loads((tmp_path / "seen.json").read_text()) == expected


def _first_draws(config, path):
    import torch.distributed as dist

    from megatron_gift.engine import trainer

    trainer._init_parallel_state(config)
    draws = [None] * dist.get_world_size()
    dist.all_gather_object(draws, torch.rand(4).tolist())
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(draws, f)


def test_pipeline_stages_draw_from_seeds_100_apart(tmp_path):
    """Megatron-LM's offset: stage k seeds with seed + 100 k, so two stages' layers do not
    start from the same weights."""
    config = parse_config(["--pipeline-model-parallel-size", "2", "--seed", "7"])
    run_distributed(2, _first_draws, config, str(tmp_path / "draws.json"))
    draws = json.loads((tmp_path / "draws.json").read_text())
    for stage, seed in enumerate((7, 107)):
        torch.manual_seed(seed)
        assert draws[stage] == torch.rand(4).tolist()


def test_a_load_without_a_checkpoint_is_refused_before_any_work(world, tmp_path):
    """A mistyped --load stops before the data is tokenised or anything is written."""
    cache = tmp_path / "cache"
    overrides = _overrides(world, data={"train_path": world["demos"], "cache_dir": str(cache)},
                           checkpoint={"load": str(tmp_path / "no-such-run"),
                                       "save": str(tmp_path / "new")})
    with pytest.raises(Exception, match=r"--load .*no-such-run: no checkpoint there"):
        _train(overrides)
    assert not cache.exists() and not (tmp_path / "new").exists()


# --- LoRA GIFT ------------------------------------------------------------------------------

LORA = {"rank": 4, "alpha": 8.0}


def _lora_run(world, tmp, name, tp=1, pp=1, parallel=(), head="logits", training=()):
    """Three SGD steps of LoRA GIFT at a layout: ``(losses, model tensors)``."""
    out = tmp / name
    overrides = _overrides(world, parallel={
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, **dict(parallel)},
        optimizer=SGD, lora=LORA, gift={"head": head}, training=dict(training),
        checkpoint={"pretrained_checkpoint": world["base"], "save": str(out / "ckpt")},
        logging={"metrics_file": str(out / "metrics.jsonl"), "progress": False})
    _train(overrides, world_size=tp * pp)
    return _losses(out / "metrics.jsonl"), _model_tensors(out / "ckpt" / "iter_0000003")


@pytest.fixture(scope="module")
def lora_one_process(world, tmp_path_factory):
    return _lora_run(world, tmp_path_factory.mktemp("lora"), "tp1")


def test_lora_gift_starts_where_full_gift_starts_and_trains_only_its_adapters(
        lora_one_process, single_process_run):
    """B = 0: the student is the base, so LoRA GIFT's first loss is full GIFT's (student =
    reference = base) to the last bits; after three steps every adapter moved (the checkpoint
    holds them alone; the base's staying frozen is checked below)."""
    losses, weights = lora_one_process
    assert losses[0] == pytest.approx(single_process_run[0][0], rel=1e-6)
    adapters = [k for k in weights if k.endswith(("lora_a", "lora_b"))]
    # 4 linears, A and B; the checkpoint stacks the layers: [layers, ...] each.
    assert len(adapters) == 2 * 4 == len(weights)
    assert all(weights[k].size(0) == TINY_MODEL["num_layers"] for k in adapters)
    trained_b = [k for k in adapters if k.endswith("lora_b")]
    assert all(weights[k].abs().max() > 0 for k in trained_b)


def _lora_job(overrides, out):
    """Set up and train a LoRA GIFT job in this rank; save what holds gradients and state."""
    from megatron.core import parallel_state

    from megatron_gift.engine import trainer as training
    from megatron_gift.engine.run_spec import resolve
    from megatron_gift.platform.distributed import init_distributed

    spec = resolve(parse_config([], defaults=overrides))
    init_distributed()
    try:
        job = training.setup(spec)
        student = job.chunks[0].student
        base = {n: p.detach().clone() for n, p in student.named_parameters() if "lora" not in n}
        training.run(job)
        params = dict(student.named_parameters())
        in_optimizer = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
        torch.save({
            "trained": [n for n, p in params.items() if p.requires_grad],
            "in_buffers": [n for n, p in params.items() if p in student.param_to_bucket_group],
            "in_optimizer": [n for n, p in params.items() if id(p) in in_optimizer],
            "unchanged": all(torch.equal(params[n], t) for n, t in base.items()),
            "no_reference": job.chunks[0].reference is None,
            "reference_is_base": job.chunks[0].reference_is_base}, out)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_lora_gives_the_base_no_gradient_buffer_no_optimizer_state_and_no_reference_copy(
        world, tmp_path):
    """Megatron-Core's DDP buckets and optimizer hold the adapters alone, the base weights are
    bit-identical after training, and no reference model is built (the base is the reference)."""
    overrides = _overrides(world, optimizer=SGD, lora=LORA, gift={"head": "logits"})
    run_distributed(1, _lora_job, overrides, tmp_path / "facts.pt", initialize=False)
    facts = torch.load(tmp_path / "facts.pt")
    assert facts["trained"] and all(n.endswith(("lora_a", "lora_b")) for n in facts["trained"])
    assert sorted(facts["in_buffers"]) == sorted(facts["in_optimizer"]) == sorted(facts["trained"])
    assert facts["unchanged"] and facts["no_reference"] and facts["reference_is_base"]


@pytest.mark.parametrize("tp,pp,parallel,head,training", [
    (2, 1, {}, "logits", {}),
    (2, 1, {"sequence_parallel": True}, "logits", {}),
    (2, 2, {"sequence_parallel": True}, "fused", {}),
    (1, 2, {}, "logits", FULL_RECOMPUTE),
    (1, 2, {"virtual_pipeline_model_parallel_size": 2}, "logits", {})],
    ids=["tp2", "tp2-sp", "tp2-pp2-sp-fused", "pp2-full-recompute", "vpp"])
def test_lora_gift_trains_at_tp2_and_pp2_like_one_process(world, lora_one_process, tmp_path,
                                                          tp, pp, parallel, head, training):
    """Adapters split as their layers (column: B by rows; row: A by columns) train like one
    process, also through the fused head and under full recompute (whose reentrant
    checkpoints need the frozen embedding's output to ask for a gradient): losses rel 1e-5 and
    each adapter's update within 1e-4 of its largest."""
    losses, weights = _lora_run(world, tmp_path, "run", tp, pp, parallel.items(), head,
                                training.items())
    expected_losses, expected = lora_one_process
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5,
                               atol=1e-6)
    for key, value in expected.items():
        if key.endswith("lora_b"):
            scale = float(value.abs().max())
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-4 * scale, msg=key)
        elif key.endswith("lora_a"):
            update = value - _lora_start(key, value)
            torch.testing.assert_close(weights[key] - _lora_start(key, value), update, rtol=0,
                                       atol=1e-4 * float(update.abs().max()) + 1e-7, msg=key)


def _lora_start(key: str, trained: torch.Tensor) -> torch.Tensor:
    """The ``A`` ``[layers, r, in]`` an adapter of the checkpoint key
    ``decoder.layers.<module>.<linear>.lora_a`` started from (seed: the run's default)."""
    from megatron_gift.config import parse_config
    from megatron_gift.core.lora import initial_a

    linear, seed = key.split(".")[-2], parse_config([]).training.seed
    return torch.stack([initial_a(f"{i + 1}.{linear}", trained.size(1), trained.size(2), seed)
                        for i in range(trained.size(0))])


def _megatron_lora_logits(directory, tokens):
    """The LoRA model of a checkpoint, built and loaded in a one-rank world: logits of the real
    vocab ``[b, s, V]``."""
    from megatron_gift.config import from_container
    from megatron_gift.core import checkpoint, model as models
    from support.parallel_harness import model_parallel, one_rank_world

    config = from_container(checkpoint.run_facts(checkpoint.latest_checkpoint(str(directory)))["config"])
    with one_rank_world(), model_parallel():
        tf_config = models.transformer_config(config, torch.float32)
        vocab = models.padded_vocab_size(config.model.vocab_size, config)
        [model] = models.build_chunks(config, tf_config, vocab, torch.device("cpu"))
        checkpoint.load_model_weights(str(directory), [model],
                                      checkpoint.architecture(config.model, vocab))
        model.eval()
        b, s = tokens.shape
        mask = torch.ones(s, s, dtype=torch.bool).triu_(1).view(1, 1, s, s)
        with torch.no_grad():
            return model(tokens, torch.arange(s).expand(b, s), mask)[..., :config.model.vocab_size]


def test_lora_exports_merged_and_as_a_peft_adapter_that_give_the_megatron_models_logits(
        world, tmp_path):
    """After LoRA GIFT: ``megatron-to-hf`` writes the merged model, which ``transformers``
    loads; ``--adapter`` writes a PEFT adapter, which ``peft`` puts onto the exported base.
    Both give the Megatron LoRA model's logits (rel 1e-4, fp32), and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_gift.commands.convert import main as convert
    from support.commands import run_main

    _lora_run(world, tmp_path, "run")
    ckpt = tmp_path / "run" / "ckpt"
    for args in (["--load", ckpt, "--out", tmp_path / "merged"],
                 ["--load", ckpt, "--out", tmp_path / "adapter", "--adapter"],
                 ["--load", world["base"], "--out", tmp_path / "base"]):
        result = run_main(convert, ["megatron-to-hf", *map(str, args)])
        assert result.returncode == 0, result.stderr
    tokens = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = _megatron_lora_logits(ckpt, tokens)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    base_logits = base(tokens).logits.detach()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for name, theirs in (("merged", merged(tokens).logits), ("peft", adapted(tokens).logits)):
        torch.testing.assert_close(theirs.detach(), ours, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(base_logits, ours, rtol=1e-4, atol=1e-5)  # the adapters count
    # An adapter written before is nobody's to replace without --overwrite: refused, untouched.
    written = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_main(convert, ["megatron-to-hf", "--load", str(ckpt), "--out",
                               str(tmp_path / "adapter"), "--adapter"])
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == written


def test_lora_checkpoints_hold_the_adapters_alone_and_resume_at_another_layout(
        world, lora_one_process, tmp_path):
    """A LoRA run saves its adapters (and optimizer state) without the base, records where the
    base came from, and resumes onto it: saved at TP=1 after two steps, resumed at TP=2 for the
    third, it gives the uninterrupted run's third loss."""
    from megatron_gift.core import checkpoint

    ckpt = str(tmp_path / "ckpt")
    overrides = _overrides(world, optimizer=SGD, lora=LORA, gift={"head": "logits"},
                           training={"train_iters": 2},
                           checkpoint={"pretrained_checkpoint": world["base"], "save": ckpt})
    _train(overrides)
    saved = _model_tensors(tmp_path / "ckpt" / "iter_0000002")
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved), sorted(saved)[:4]
    assert checkpoint.run_facts(str(tmp_path / "ckpt" / "iter_0000002"))["lora_base"]
    metrics = tmp_path / "resumed.jsonl"
    _train(_overrides(world, optimizer={**SGD, "override_opt_param_scheduler": True},
                      lora=LORA, gift={"head": "logits"},
                      parallel={"tensor_model_parallel_size": 2},
                      checkpoint={"load": ckpt, "save": ckpt},
                      logging={"metrics_file": str(metrics), "progress": False}), world_size=2)
    resumed = [r for r in _metrics(metrics) if "loss" in r]
    assert [r["iteration"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(lora_one_process[0][2], rel=1e-5)


def test_the_rl_hand_offs_refuse_a_lora_checkpoint_naming_the_merged_route(world, tmp_path):
    """NeMo RL and NeMo-Aligner load Megatron checkpoints whole; a LoRA run's hold its adapters
    alone: each hand-off refuses it in one line that names the merged export."""
    from megatron_gift.rl import handoff, nemo_aligner

    _lora_run(world, tmp_path, "run")
    ckpt = str(tmp_path / "run" / "ckpt")
    with pytest.raises(ValueError, match="holds a LoRA run's adapters alone: hand off the "
                                         "merged model.*megatron-to-hf"):
        handoff.megatron_lm_iteration(ckpt)
    with pytest.raises(ValueError, match="is a LoRA run: hand off the merged model"):
        nemo_aligner.write_nemo_aligner(ckpt, None, str(tmp_path / "aligner"))
    assert not (tmp_path / "aligner").exists()
