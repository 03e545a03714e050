"""Hugging Face <-> Megatron-Core: tiny random Llama / Qwen2 / Qwen3 / Mistral models built from
configs.

Imports give the same logits as ``transformers`` at TP=1, TP=2 and PP=2 (fp32, atol 2e-5);
exports reload in ``transformers`` with bit-identical weights; GIFT trains from an HF
directory directly; bad directories fail with errors that name the problem.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig,
                          MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig)

from megatron_gift.demo import synthetic
from support.commands import run_main
from support.parallel_harness import model_parallel, run_distributed

VOCAB = 300  # > the bundled tokenizer, not a multiple of 128: the model pads it to 384
SEQ = 12
FAMILIES = {
    # Llama 3.x: llama3 RoPE scaling, untied.
    "llama": lambda: LlamaConfig(
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                         "rope_theta": 500000.0},
        max_position_embeddings=16384, rms_norm_eps=1e-5, **_dims()),
    # Qwen2.5: QKV bias, tied embeddings.
    "qwen2": lambda: Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, **_dims()),
    # Qwen3: q/k RMSNorm per head, a head dim other than hidden / heads, untied.
    "qwen3": lambda: Qwen3Config(head_dim=24, tie_word_embeddings=False, rope_theta=1e6,
                                 **_dims()),
    # Qwen3-MoE: 4 experts, top 2 renormalised, layer 1 dense (mlp_only_layers), tied.
    "qwen3_moe": lambda: Qwen3MoeConfig(
        head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        mlp_only_layers=[1], norm_topk_prob=True, tie_word_embeddings=True, **_dims()),
    # Mistral: a head dim other than hidden / heads, and a window the sequence stays within.
    "mistral": lambda: MistralConfig(head_dim=24, sliding_window=64, **_dims()),
}


def _dims():
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


def make_hf_model(directory, family, dtype=torch.float32, seed=0):
    """A random HF model of ``family`` with the bundled tokenizer, saved in ``directory``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).to(dtype)
    with torch.no_grad():  # random biases, so the QKV bias mapping is checked too
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):  # q_norm, k_norm too
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR).save_pretrained(directory)
    return model


def convert_cli(*args):
    """``python -m megatron_gift.convert ARGS``, run in this process (see support/commands.py)."""
    from megatron_gift.commands.convert import main

    return run_main(main, args)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_hf_model(root / "hf", request.param)
    result = convert_cli("hf-to-megatron", "--hf", root / "hf", "--out", root / "megatron")
    assert result.returncode == 0, result.stderr
    assert "builtin converter" in result.stdout
    return request.param, root


def _megatron_logits(hf_dir, checkpoint_dir, tokens, tp, pp, sequence_parallel=False, ep=1):
    """Full-vocab logits of the imported model at TP x PP, on the last stage's ranks."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_gift.core import checkpoint, model as models
    from megatron_gift.engine import sources
    from megatron_gift.config import parse_config

    config = parse_config([], defaults={
        "model": {"seq_length": SEQ},
        "checkpoint": {"pretrained_checkpoint": str(hf_dir)},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "sequence_parallel": sequence_parallel, "expert_model_parallel_size": ep}})
    config = sources.resolve_model(config, 0)
    with model_parallel(tp=tp, pp=pp, ep=ep):
        tf_config = models.transformer_config(config, torch.float32)
        vocab = models.padded_vocab_size(config.model.vocab_size, config)
        [model] = models.build_chunks(config, tf_config, vocab, torch.device("cpu"))
        checkpoint.load_model_weights(str(checkpoint_dir), [model],
                                      checkpoint.architecture(config.model, vocab))
        model.eval()  # inference (Megatron-Core's MoE layer wants SP with TP when training)
        b, s = tokens.shape
        mask = torch.ones(s, s, dtype=torch.bool).triu_(1).view(1, 1, s, s)

        def step(iterator, chunk):
            out = chunk(next(iterator), torch.arange(s).expand(b, s), mask)
            return out, lambda x: (x.sum(), {"logits": gather_from_tensor_model_parallel_region(x)})

        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            return outputs[0]["logits"]
        return None


def _check_logits(hf_dir, checkpoint_dir, tp, pp, vocab=VOCAB, sequence_parallel=False, ep=1):
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    logits = _megatron_logits(hf_dir, checkpoint_dir, tokens, tp, pp, sequence_parallel, ep)
    if logits is None:
        return
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
    assert logits.shape[-1] == 128 * -(-vocab // 128) and reference.shape[-1] == vocab
    torch.testing.assert_close(logits[..., :vocab], reference.detach(), rtol=0, atol=2e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_imported_model_gives_the_logits_of_transformers(imported, tp, pp):
    family, root = imported
    # An MoE model at TP > 1 runs with sequence parallelism, as it trains.
    run_distributed(tp * pp, _check_logits, root / "hf", root / "megatron", tp, pp, VOCAB,
                    family == "qwen3_moe" and tp > 1)


def test_export_reloads_in_transformers_with_identical_weights(imported, tmp_path):
    family, root = imported
    result = convert_cli("megatron-to-hf", "--load", root / "megatron", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    original = AutoModelForCausalLM.from_pretrained(root / "hf").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(exported).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "qwen3": "Qwen3ForCausalLM",
                                       "qwen3_moe": "Qwen3MoeForCausalLM",
                                       "mistral": "MistralForCausalLM"}[family]
    state = exported.state_dict()
    assert sorted(state) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(root / "hf").get_vocab()


@pytest.mark.slow
def test_bf16_round_trip_is_bit_identical(tmp_path):
    original = make_hf_model(tmp_path / "hf", "qwen2", dtype=torch.bfloat16)
    assert convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out",
                       tmp_path / "megatron").returncode == 0
    result = convert_cli("megatron-to-hf", "--load", tmp_path / "megatron", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").state_dict()
    for name, tensor in original.state_dict().items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor), name


@pytest.mark.system  # the real command, and a job's conversion runs it too
def test_unsupported_architecture_is_named(tmp_path):
    from megatron_gift.errors import UserError
    from megatron_gift.hf.convert import cached_conversion

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-m", "megatron_gift.convert", "hf-to-megatron",
                             "--hf", tmp_path, "--out", tmp_path / "out"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "GPT2LMHeadModel" in result.stderr and "LlamaForCausalLM, Qwen2ForCausalLM" in result.stderr
    assert not (tmp_path / "out").exists()
    # In a job (--pretrained-checkpoint HF_DIR) it is the same one-line user error.
    with pytest.raises(UserError, match=f"converting {tmp_path}: .*GPT2LMHeadModel"):
        cached_conversion(str(tmp_path), str(tmp_path / "cache"))


def test_missing_shard_and_missing_tokenizer_are_reported(tmp_path):
    make_hf_model(tmp_path / "hf", "llama")
    os.remove(tmp_path / "hf" / "tokenizer.json")
    result = convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", tmp_path / "out")
    assert result.returncode == 2 and "no tokenizer files" in result.stderr
    AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR).save_pretrained(tmp_path / "hf")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    with open(tmp_path / "hf" / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    result = convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "missing: ['model-00002-of-00002.safetensors']" in result.stderr
    assert not (tmp_path / "out").exists()


def checkpoint_args(directory):
    """(TP, PP) from the Megatron-LM ``args`` in a checkpoint's common state, as Megatron-Bridge
    reads them."""
    from megatron.core import dist_checkpointing

    import megatron_gift.core.checkpoint  # noqa: F401  (allows argparse.Namespace in weights-only loads)

    args = dist_checkpointing.load_common_state_dict(str(directory))["args"]
    return args.tensor_model_parallel_size, args.pipeline_model_parallel_size


def _train_rank(overrides):
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    train(parse_config([], defaults=overrides))


def _gift_overrides(tmp_path, pretrained, **checkpoint):
    demos = tmp_path / "demos.jsonl"
    if not demos.exists():
        synthetic.write_demonstrations(str(demos), 32, seed=1)
    return {"model": {"seq_length": 32},
            "parallel": {"tensor_model_parallel_size": 2},
            "data": {"train_path": str(demos)},
            "training": {"train_iters": 3, "micro_batch_size": 2, "global_batch_size": 4},
            "optimizer": {"lr": 1e-3, "lr_decay_style": "constant"},
            "checkpoint": {"pretrained_checkpoint": pretrained and str(pretrained), **checkpoint},
            "logging": {"metrics_file": str(tmp_path / "metrics.jsonl"), "progress": False}}


@pytest.mark.system  # the job converts the HF directory (a program), on two ranks
@pytest.mark.slow
def test_gift_trains_from_a_hugging_face_directory_and_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "hf", "qwen2")
    run_distributed(2, _train_rank, _gift_overrides(tmp_path, tmp_path / "hf",
                                                    save=str(tmp_path / "gift")), initialize=False)
    [cached] = [n for n in os.listdir(tmp_path / "cache") if n != "data"]  # converted once
    assert checkpoint_args(tmp_path / "cache" / cached / "iter_0000000") == (1, 1)
    assert checkpoint_args(tmp_path / "gift" / "iter_0000003") == (2, 1)
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (tmp_path / "gift" / "hf" / "config.json").exists()  # the assets travel along
    from megatron_gift.core.checkpoint import run_facts

    facts = run_facts(str(tmp_path / "gift" / "iter_0000003"))  # which converter ran, recorded
    assert facts["converter"] == "builtin" and facts["converted_from"] == [str(tmp_path / "hf")]
    result = convert_cli("megatron-to-hf", "--load", tmp_path / "gift", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert sorted(trained) == sorted(base)
    changed = [name for name in base if not torch.equal(trained[name], base[name])]
    assert "model.layers.0.self_attn.q_proj.bias" in changed and len(changed) > len(base) // 2
    # Resuming needs only --load: the model section and tokenizer come from gift/hf.
    resume = _gift_overrides(tmp_path, None, load=str(tmp_path / "gift"), save=str(tmp_path / "gift"))
    resume["training"]["train_iters"] = 4
    resume["optimizer"]["override_opt_param_scheduler"] = True  # 3 -> 4 iterations
    resume["gift"] = {"reference_load": str(tmp_path / "hf")}
    run_distributed(2, _train_rank, resume, initialize=False)
    assert (tmp_path / "gift" / "iter_0000004").is_dir()


@pytest.mark.system  # the job converts both directories (a program), on a rank
@pytest.mark.parametrize("mismatch", ["vocab_size", "dtype"])
def test_reference_that_differs_from_the_student_is_refused_before_training(tmp_path, monkeypatch,
                                                                            mismatch):
    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "student", "llama")
    if mismatch == "dtype":
        make_hf_model(tmp_path / "reference", "llama", dtype=torch.bfloat16)
    else:
        config = FAMILIES["llama"]()
        config.vocab_size = VOCAB + 8
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "reference")
        AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR).save_pretrained(tmp_path / "reference")
    overrides = _gift_overrides(tmp_path, tmp_path / "student", save=str(tmp_path / "gift"))
    overrides["gift"] = {"reference_load": str(tmp_path / "reference")}
    overrides["parallel"] = {"tensor_model_parallel_size": 1}
    expected = {"vocab_size": f"in vocab_size: {VOCAB + 8} vs {VOCAB}",
                "dtype": "in dtype: bfloat16 vs float32"}[mismatch]
    with pytest.raises(Exception, match=expected):
        run_distributed(1, _train_rank, overrides, initialize=False)
    assert not (tmp_path / "gift").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_model_trained_here_exports_as_llama_with_the_same_logits(tmp_path, tiny_world):
    """The session's tiny base, trained here from scratch, exports as a Llama."""
    base = tiny_world["base"]
    result = convert_cli("megatron-to-hf", "--load", base, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "hf"))
    run_distributed(1, _check_logits, tmp_path / "hf", base, 1, 1, vocab)


@pytest.mark.system
@pytest.mark.slow
def test_launcher_trains_from_a_hugging_face_directory_and_data_file(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral")
    demos = tmp_path / "demos.jsonl"
    synthetic.write_demonstrations(str(demos), 16, seed=1)
    env = {**os.environ, "MEGATRON_GIFT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "examples/pretrain_gift.py", "--pretrained-checkpoint", str(tmp_path / "hf"),
         "--train-path", str(demos), "--seq-length", "32", "--train-iters", "2",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--save", str(tmp_path / "gift"),
         "--no-progress"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "builtin converter" in result.stdout
    assert "runs/default" not in result.stdout + result.stderr  # the embedded job stays out
    assert (tmp_path / "gift" / "iter_0000002").is_dir()


def test_bridge_converter_without_megatron_bridge_is_refused(tmp_path, monkeypatch, capsys):
    from megatron_gift import convert

    monkeypatch.setitem(sys.modules, "megatron.bridge", None)  # as where it is not installed
    make_hf_model(tmp_path / "hf", "llama")
    with pytest.raises(SystemExit) as exit_:
        convert.main(["hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out",
                      str(tmp_path / "out"), "--converter", "bridge"])
    assert exit_.value.code == 2
    assert ("--converter bridge: Megatron-Bridge (megatron.bridge) is not installed"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_the_trainer_refuses_the_bridge_converter_without_bridge_before_any_work(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "megatron.bridge", None)  # as where it is not installed
    make_hf_model(tmp_path / "hf", "llama")
    overrides = _gift_overrides(tmp_path, tmp_path / "hf", save=str(tmp_path / "gift"),
                                converter="bridge")
    overrides["parallel"] = {"tensor_model_parallel_size": 1}
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    with pytest.raises(ValueError, match="--converter bridge: Megatron-Bridge"):
        train(parse_config([], defaults=overrides))
    assert not (tmp_path / "gift").exists() and not (tmp_path / "cache").exists()


@pytest.mark.system  # each job's conversion is a program
@pytest.mark.slow
def test_two_jobs_converting_one_model_together_leave_one_complete_conversion(tmp_path):
    """A sweep started together: each converts privately, the first rename wins."""
    import threading

    from megatron_gift.hf.convert import cached_conversion

    make_hf_model(tmp_path / "hf", "llama")
    cache, results, partial = tmp_path / "cache", [], []
    jobs = [threading.Thread(target=lambda: results.append(
        cached_conversion(str(tmp_path / "hf"), str(cache)))) for _ in range(2)]
    for job in jobs:
        job.start()
    while any(job.is_alive() for job in jobs):  # the final directory is complete or absent
        for name in os.listdir(cache) if cache.exists() else ():
            if not name.endswith(".tmp") and not (cache / name / "hf" / "config.json").exists():
                partial.append(name)
    for job in jobs:
        job.join()
    assert partial == [] and len(results) == 2 and results[0] == results[1]
    assert os.listdir(cache) == [os.path.basename(results[0])]  # no private leftovers
    assert (cache / os.path.basename(results[0]) / "iter_0000000" / "metadata.json").exists()


def test_convert_over_an_existing_model_is_refused_unless_overwrite(tmp_path):
    """A second conversion into the same --out changes nothing without --overwrite, and with
    it replaces the old checkpoint whole (no stale iteration left); --out over other files is
    always refused."""
    make_hf_model(tmp_path / "hf", "llama")
    out = tmp_path / "ckpt"
    assert convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", out).returncode == 0
    (out / "iter_0000005").mkdir()  # a stale iteration a plain overwrite would leave behind
    before = sorted(os.listdir(out))
    again = convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", out)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: --out {out} holds a model already: pass --overwrite to replace it, or give "
        "another --out")
    assert sorted(os.listdir(out)) == before
    replaced = convert_cli("hf-to-megatron", "--hf", tmp_path / "hf", "--out", out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "iter_0000005" not in os.listdir(out) and (out / "iter_0000000").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no private directory left
    exported = convert_cli("megatron-to-hf", "--load", out, "--out", tmp_path / "hf")
    assert exported.returncode == 2 and "--out" in exported.stderr and "--overwrite" in exported.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    other = convert_cli("megatron-to-hf", "--load", out, "--out", tmp_path / "notes", "--overwrite")
    assert other.returncode == 2 and "holds other files" in other.stderr
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def _final_tensors(directory):
    """Unsharded model tensors of a checkpoint, read in a one-rank world."""
    from megatron.core import dist_checkpointing

    from support.parallel_harness import one_rank_world

    with one_rank_world():
        tensors = dist_checkpointing.load_plain_tensors(str(directory))
    return {k: v for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


@pytest.mark.distributed
def test_qwen3_trains_at_tp2_like_one_process(tmp_path):
    """Qwen3's per-head query/key norms are replicated while their heads are split over TP:
    their gradients must be summed over TP (Megatron-Core's finalize_model_grads does it by
    name under qk_layernorm). Three SGD steps at TP=2 give the losses and updates of TP=1."""
    make_hf_model(tmp_path / "hf", "qwen3")
    assert convert_cli("hf-to-megatron", "--hf", tmp_path / "hf",
                       "--out", tmp_path / "megatron").returncode == 0
    losses, weights = {}, {}
    for tp in (1, 2):
        overrides = _gift_overrides(tmp_path, tmp_path / "megatron", save=str(tmp_path / f"tp{tp}"))
        overrides["parallel"]["tensor_model_parallel_size"] = tp
        overrides["optimizer"] = {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0,
                                  "lr_decay_style": "constant"}
        overrides["logging"]["metrics_file"] = str(tmp_path / f"tp{tp}.jsonl")
        run_distributed(tp, _train_rank, overrides, initialize=False)
        with open(tmp_path / f"tp{tp}.jsonl") as f:
            losses[tp] = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        weights[tp] = _final_tensors(tmp_path / f"tp{tp}" / "iter_0000003")
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), rtol=1e-5,
                               atol=1e-6)
    _assert_same_updates(weights[2], weights[1], tmp_path / "megatron",
                         lambda key: "q_layernorm" in key or "k_layernorm" in key)


def _assert_same_updates(trained, expected, base_dir, selected):
    """Per selected tensor (at least one), the update from the base within 1e-4 of the
    expected update's largest element."""
    base = _final_tensors(base_dir / "iter_0000000")
    keys = [k for k in base if selected(k)]
    assert keys
    for key in keys:
        update = expected[key] - base[key]
        assert update.abs().max() > 0, key
        torch.testing.assert_close(trained[key] - base[key], update, rtol=0,
                                   atol=1e-4 * float(update.abs().max()), msg=key)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-MoE from transformers and its conversion: ``root`` with ``hf/`` and
    ``megatron/``."""
    root = tmp_path_factory.mktemp("moe")
    make_hf_model(root / "hf", "qwen3_moe")
    assert convert_cli("hf-to-megatron", "--hf", root / "hf",
                       "--out", root / "megatron").returncode == 0
    return root


@pytest.mark.distributed
def test_qwen3_moe_at_ep2_gives_the_logits_of_transformers(moe):
    """Two ranks each holding two of the four experts (the dispatcher gathers the tokens and
    scatters the experts' outputs back) give transformers' logits."""
    run_distributed(2, _check_logits, moe / "hf", moe / "megatron", 1, 1, VOCAB, False, 2)


def _train_moe(tmp_path, base, name, world, parallel, iters=3, save=None, **checkpoint):
    overrides = _gift_overrides(tmp_path, base, save=str(tmp_path / (save or name)),
                                **checkpoint)
    overrides["parallel"] = parallel
    overrides["training"]["train_iters"] = iters
    overrides["training"]["moe_aux_loss_coeff"] = 0.01
    overrides["optimizer"] = {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0,
                              "lr_decay_style": "constant", "override_opt_param_scheduler": True}
    overrides["logging"]["metrics_file"] = str(tmp_path / f"{name}.jsonl")
    run_distributed(world, _train_rank, overrides, initialize=False)
    with open(tmp_path / f"{name}.jsonl") as f:
        records = [json.loads(line) for line in f]
    return ([r["loss"] for r in records if "loss" in r],
            _final_tensors(tmp_path / (save or name) / f"iter_{iters:07d}"))


@pytest.mark.distributed
@pytest.mark.slow
def test_qwen3_moe_trains_at_ep2_like_ep1_and_resumes_across_ep(moe, tmp_path):
    """Data-parallel 2 with the experts replicated (EP=1) and split (EP=2), also with TP=2 and
    with PP=2: the same losses and updates (SGD, 3 steps, the student's load-balancing loss
    on). A checkpoint saved at EP=2 resumes at EP=1 on the same curve (Megatron-Core's
    dist-checkpoint reshards the experts)."""
    base = moe / "megatron"
    ep1 = _train_moe(tmp_path, base, "ep1", 2, {"expert_model_parallel_size": 1})
    ep2 = _train_moe(tmp_path, base, "ep2", 2, {"expert_model_parallel_size": 2}, iters=2)
    torch.testing.assert_close(torch.tensor(ep2[0]), torch.tensor(ep1[0][:2]), rtol=1e-5,
                               atol=1e-6)
    resumed = _train_moe(tmp_path, base, "resumed", 2, {"expert_model_parallel_size": 1},
                         save="ep2", load=str(tmp_path / "ep2"))
    assert resumed[0] == pytest.approx(ep1[0][2:], rel=1e-5)
    _assert_same_updates(resumed[1], ep1[1], base,
                         lambda key: "experts" in key or "router" in key)
    # With TP=2 (and SP, which an MoE model at TP > 1 needs; the experts split by TP too) and
    # with PP=2: four ranks, two of them data-parallel, the same losses.
    for name, parallel in (("ep2-tp2", {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
                           ("ep2-pp2", {"pipeline_model_parallel_size": 2})):
        losses, trained = _train_moe(tmp_path, base, name, 4,
                                     {"expert_model_parallel_size": 2, **parallel})
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ep1[0]), rtol=1e-5,
                                   atol=1e-6, msg=name)
        _assert_same_updates(trained, ep1[1], base,
                             lambda key: "experts" in key or "router" in key)


def _moe_gift_rank(overrides, hf_dir, out):
    """Train GIFT on a Qwen3-MoE with a load-balancing loss, recording which routers attach
    one; then the frozen reference's logits on a batch, beside transformers' base model's."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_gift.config import parse_config
    from megatron_gift.engine import trainer as training
    from megatron_gift.engine.run_spec import resolve
    from megatron_gift.platform.distributed import init_distributed

    attached = []
    original = TopKRouter.attach_and_log_load_balancing_loss

    def recording(self, *args, **kwargs):
        attached.append(self)
        return original(self, *args, **kwargs)

    TopKRouter.attach_and_log_load_balancing_loss = recording
    spec = resolve(parse_config([], defaults=overrides))
    init_distributed()
    job = training.setup(spec)
    reference = job.chunks[0].reference
    before = {n: t.detach().clone() for n, t in
              [*reference.named_parameters(), *reference.named_buffers()]}
    training.run(job)
    after = dict([*reference.named_parameters(), *reference.named_buffers()])
    routers = {id(m) for m in reference.modules() if isinstance(m, TopKRouter)}
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    s = tokens.size(1)
    mask = torch.ones(s, s, dtype=torch.bool).triu_(1).view(1, 1, s, s)
    with torch.no_grad():
        ours = reference(tokens, torch.arange(s).expand(2, s), mask)[..., :VOCAB]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
    torch.save({"attached_by_reference": sum(id(r) in routers for r in attached),
                "attached": len(attached), "training": reference.training,
                "changed": [n for n in before if not torch.equal(before[n], after[n])],
                "ours": ours, "base": base.detach()}, out)


@pytest.mark.distributed
def test_moe_gift_the_reference_stays_frozen_and_routes_as_the_base(moe, tmp_path):
    """GIFT on Qwen3-MoE (3 steps, load-balancing loss 0.01): the student's routers attach the
    loss and the run logs it beside GIFT's; the reference's never do, it stays in eval mode with
    every parameter and buffer unchanged, and its logits (hence GIFT's target, a function of
    them and the label) equal those of the HF base model run by transformers (rel 1e-4)."""
    overrides = _gift_overrides(tmp_path, moe / "megatron", save=str(tmp_path / "run"))
    overrides["parallel"] = {}
    overrides["training"]["moe_aux_loss_coeff"] = 0.01
    run_distributed(1, _moe_gift_rank, overrides, moe / "hf", tmp_path / "out.pt",
                    initialize=False)
    result = torch.load(tmp_path / "out.pt")
    assert result["attached"] > 0 and result["attached_by_reference"] == 0
    assert not result["training"] and result["changed"] == []
    torch.testing.assert_close(result["ours"], result["base"], rtol=1e-4, atol=1e-4)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    assert len(records) == 3 and all(r["moe_aux_loss"] > 0 for r in records)
