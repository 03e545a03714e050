"""Sampling and scoring a checkpoint (``python -m megatron_gift.evaluate``), its metrics, and the
reproduction study's arithmetic-chain world."""

import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_gift.evaluation.metrics import (gift_target_mass, mean_ci, paired_difference,
                                              pass_at_k, pass_at_k_curve, style_diversity)


def brute_force_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (c of them correct) holding a correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_k_curve_averages_prompts():
    curve = pass_at_k_curve([0, 16, 8], 16, [1, 16])
    assert curve["1"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert curve["16"] == pytest.approx(2 / 3)


def test_mean_ci_and_paired_difference():
    ci = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (ci["mean"], ci["low"], ci["high"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-3)
    assert mean_ci([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}
    d = paired_difference([0.3, 0.5, 0.4], [0.2, 0.1, 0.5])
    assert d["mean"] == pytest.approx(0.4 / 3) and (d["wins"], d["losses"]) == (2, 1)


@pytest.mark.parametrize("beta", [0.0, 1.0, 5.0, 20.0, 50.0, math.inf])
@pytest.mark.parametrize("p", [0.9, 0.3, 1e-3, 1e-9])
def test_gift_target_mass_is_the_softmax_of_tilted_log_probs(beta, p):
    vocab, smooth = 7, 0.01
    ref = torch.tensor([p] + [(1 - p) / (vocab - 1)] * (vocab - 1), dtype=torch.float64)
    tilted = torch.log((1 - smooth) * ref + smooth / vocab)
    tilted[0] += beta if math.isfinite(beta) else 1e6
    expected = torch.softmax(tilted, 0)[0].item()
    assert gift_target_mass(math.log(p), beta, smooth, vocab) == pytest.approx(expected, rel=1e-9)


def test_style_diversity():
    d = style_diversity([["stepwise", "compact"], ["stepwise", "stepwise"]],
                        [[True, True], [True, False]])
    assert d["shares"] == {"compact": 0.25, "stepwise": 0.75}
    assert d["entropy_bits"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert d["distinct_correct_styles"] == 1.5


def test_two_step_chains_are_the_default_worlds_problems():
    from megatron_gift.demo import chains, synthetic

    for seed in range(50):
        assert chains.chain_problem(random.Random(seed), 2) == synthetic.problem(random.Random(seed))


def test_chain_styles_and_answers():
    from megatron_gift.demo import chains
    from megatron_gift.demo.synthetic import answer_of

    prompt, responses = chains.chain_problem(random.Random(3), 3)
    assert prompt == "Q: ( ( 4 * 9 ) - 3 ) * 6 = ?"
    assert responses["stepwise"] == "4 * 9 = 36 , 36 - 3 = 33 , 33 * 6 = 198 . A: 198"
    assert responses["backward"] == "33 * 6 = 198 where 36 - 3 = 33 where 4 * 9 = 36 . A: 198"
    assert responses["compact"] == "( 36 ) - 3 = 33 , ( 33 ) * 6 = 198 . A: 198"
    for style, text in responses.items():
        assert chains.classify_style(text) == style and answer_of(text) == "198"
    assert chains.classify_style("7 7 .") == "other"


def test_token_kinds():
    from megatron_gift.evaluation.policy import token_kinds

    tokens = "3 + 4 = 7 , 7 * 2 = 1 4 . A: - 8 <eos>".split()
    assert token_kinds(tokens) == ["operand", "symbol", "operand", "symbol", "result", "symbol",
                                   "operand", "symbol", "operand", "symbol", "result", "result",
                                   "symbol", "symbol", "result", "result", "eos"]


def test_sampled_log_probs_match_a_scoring_pass(tiny_world):
    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.sampling import load_policy, sample, sequence_logprobs

    model, tokenizer = load_policy(tiny_world["base"])
    prompts = [prompt_ids(tokenizer, "Q: ( 1 + 2 ) * 3 = ?"), prompt_ids(tokenizer, "Q: 1 + 2 = ?")]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    out = sample(model, tokenizer, prompts * 3, 12, torch.Generator().manual_seed(0))
    with torch.no_grad():
        scored = sequence_logprobs(model, prompts * 3, out.tokens, tokenizer.pad_token_id)
    for sampled, again, tokens in zip(out.logprobs, scored, out.tokens):
        assert len(sampled) == len(tokens) == len(again) > 0
        assert torch.allclose(torch.tensor(sampled), again, atol=1e-4)
        assert tokenizer.eos_token_id not in tokens[:-1]


def test_evaluate_command_on_a_trained_checkpoint(tiny_world, tmp_path, capsys):
    from megatron_gift.commands.evaluate import main

    out = tmp_path / "eval.json"
    main(["--load", tiny_world["base"], "--data", tiny_world["valid"], "--samples", "4",
          "--limit", "3", "--max-new-tokens", "16", "--reference", tiny_world["base"],
          "--beta", "2", "inf", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "3 prompts x 4 samples: pass@1" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["prompts"] == 3 and result["samples"] == 4
    curve = [result["pass@k"][str(k)] for k in range(1, 5)]
    assert curve == sorted(curve) and result["pass@1"] == curve[0]
    assert 0 <= curve[0] <= curve[-1] <= 1
    assert abs(result["kl_to_reference"]) < 1e-4  # the reference is the model itself
    assert result["entropy"] > 0 and result["length"] > 0
    assert abs(sum(result["styles"]["shares"].values()) - 1) < 1e-9
    tokens = result["gift_tokens"]
    assert tokens["beta"]["inf"]["share_q_below_half"] == 0 and tokens["beta"]["inf"]["mean_q"] == 1
    assert 0 < tokens["beta"]["2"]["mean_q"] < 1


def test_evaluate_counts_right_answers(tiny_world, tmp_path):
    """A model that always answers right scores 1, one that never does 0 (the checker is live)."""
    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.policy import evaluate_policy
    from megatron_gift.evaluation.sampling import load_policy

    model, tokenizer = load_policy(tiny_world["base"])
    records = [{"prompt": "Q: ( 1 + 2 ) * 3 = ?", "answer": "9"}]
    answer = tokenizer("A: 9", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    class Scripted(torch.nn.Module):  # emits "A: 9 <eos>" whatever the context
        config = model.config

        def forward(self, input_ids, attention_mask, position_ids, **_):
            steps = attention_mask.shape[1] - len(prompt_ids(tokenizer, records[0]["prompt"]))
            logits = torch.full((*input_ids.shape, len(tokenizer)), -1e9)
            logits[:, -1, answer[min(steps, len(answer) - 1)]] = 0
            return type("Out", (), {"logits": logits, "past_key_values": None})()

    right = evaluate_policy(Scripted(), tokenizer, records, samples=4, max_new_tokens=8)
    assert right["pass@1"] == 1.0 and right["pass@k"]["4"] == 1.0
    wrong = evaluate_policy(Scripted(), tokenizer, [{**records[0], "answer": "8"}], samples=4,
                            max_new_tokens=8)
    assert wrong["pass@1"] == 0.0 and wrong["pass@k"]["4"] == 0.0


def test_evaluate_refuses_missing_files_and_fields(tmp_path):
    """A record without the prompt or answer field is named by file, line and flag."""
    from megatron_gift.errors import UserError
    from megatron_gift.evaluation.policy import read_records

    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: 1 + 1 = ?", "answer": "2"}) + "\n\n"
                   + json.dumps({"prompt": "Q: 1 + 2 = ?", "solution": "3"}) + "\n")
    with pytest.raises(UserError, match=re.escape(
            f"--data {bad}:3: no field 'answer' (name the field with --answer-field; "
            "the record has 'prompt', 'solution')")):
        read_records(str(bad))
    with pytest.raises(UserError, match=re.escape(f"--data {bad}:1: no field 'question' "
                                                  "(name the field with --prompt-field")):
        read_records(str(bad), prompt_field="question")
    assert len(read_records(str(bad), limit=1)) == 1  # the bad record is past the limit
    bad.write_text('{"prompt": "Q: 1 + 1 = ?", "answer": "2"}\n{"prompt": \n')
    with pytest.raises(UserError, match=re.escape(f"--data {bad}:2: not a JSON record")):
        read_records(str(bad))
    bad.write_text("")
    with pytest.raises(UserError, match="no records"):
        read_records(str(bad))


def test_checkers():
    from megatron_gift.evaluation.policy import checker_for

    answer, math_ = checker_for("answer"), checker_for("math")
    assert answer("3 + 4 = 7 . A: 1 4", "14") and not answer("A: 15", "14") and not answer("14", "14")
    assert math_("so the answer is $\\frac{1}{2}$", "0.5") and not math_("the answer is 3", "0.5")


# The command line, on a scripted policy (no checkpoint is loaded).

WORLD_RECORD = {"prompt": "Q: ( 1 + 2 ) * 3 = ?", "answer": "9"}


class Scripted(torch.nn.Module):
    """Emits ``text`` and eos whatever the prompt (a left-padded batch, through the KV cache)."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.script = (tokenizer(text, add_special_tokens=False)["input_ids"]
                       + [tokenizer.eos_token_id])
        self.vocab = len(tokenizer)

    def forward(self, input_ids, attention_mask, past_key_values=None, **_):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((*input_ids.shape, self.vocab), -1e9)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 0
        return SimpleNamespace(logits=logits, past_key_values=step)


@pytest.fixture
def scripted_command(tmp_path, monkeypatch):
    """``run(records, *flags, text=...)``: the evaluate command over ``records`` (written as
    JSONL) with a policy that always answers ``text``; ``--load`` is an existing directory."""
    from transformers import AutoTokenizer

    from megatron_gift.demo import synthetic
    from megatron_gift.commands.evaluate import main
    from megatron_gift.evaluation import sampling

    monkeypatch.delenv("RANK", raising=False)
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    data = tmp_path / "data.jsonl"

    def run(records, *flags, text="1 + 2 = 3 , 3 * 3 = 9 . A: 9"):
        monkeypatch.setattr(sampling, "load_policy",
                            lambda path: (Scripted(tokenizer, text), tokenizer))
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        main(["--load", str(tmp_path), "--data", str(data), *flags])

    return run


def _refused(capsys, run, *argv, records=(WORLD_RECORD,)) -> str:
    """The one line a refused command prints; it exits with USER_ERROR_EXIT."""
    from megatron_gift.errors import USER_ERROR_EXIT

    with pytest.raises(SystemExit) as stop:
        run(list(records), *argv)
    err = capsys.readouterr().err
    assert stop.value.code == USER_ERROR_EXIT == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--samples", "0"),
                                         ("--max-new-tokens", "0"), ("--batch-size", "-4")])
def test_non_positive_counts_are_refused_in_one_line(scripted_command, capsys, flag, value):
    assert _refused(capsys, scripted_command, flag, value) == (
        f"error: {flag} must be >= 1, got {value}")


def test_beta_without_reference_is_refused(scripted_command, capsys):
    assert _refused(capsys, scripted_command, "--beta", "5") == (
        "error: --beta needs --reference (the GIFT diagnostics score the demonstrations under "
        "the reference model)")
    scripted_command([WORLD_RECORD])  # without --beta the default betas go unused, silently
    assert "pass@1 1.000" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_one_line(scripted_command, capsys, tmp_path):
    missing = tmp_path / "missing"
    err = _refused(capsys, scripted_command, "--reference", str(missing))
    assert err == f"error: --reference {missing}: no such file or directory"
    assert "--answer-field" in _refused(capsys, scripted_command, records=[{"prompt": "Q"}])
    assert "--samples: invalid int value: 'many'" in _refused(capsys, scripted_command,
                                                              "--samples", "many")
    assert "unrecognized arguments: --sampels 4" in _refused(capsys, scripted_command,
                                                             "--sampels", "4")
    from megatron_gift.commands.evaluate import main

    with pytest.raises(SystemExit) as stop:
        main(["--load", str(missing), "--data", str(missing)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --load {missing}: no such file or directory\n"
    with pytest.raises(SystemExit) as stop:
        main(["--load", str(tmp_path), "--data", str(missing)])
    assert (stop.value.code, capsys.readouterr().err) == (
        2, f"error: --data {missing}: no such file\n")
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(missing)])
    assert (stop.value.code, capsys.readouterr().err) == (
        2, "error: the following arguments are required: --load (see --help)\n")


def test_styles_are_reported_for_the_arithmetic_world_only(scripted_command, capsys, tmp_path):
    out = tmp_path / "result.json"
    scripted_command([WORLD_RECORD], "--samples", "2", "--out", str(out))
    printed = capsys.readouterr().out
    assert 'styles {"stepwise": 1.0}' in printed
    assert json.loads(out.read_text())["styles"]["shares"] == {"stepwise": 1.0}
    other = {"prompt": "What is one plus two?", "answer": "3"}
    scripted_command([other], "--samples", "2", "--out", str(out), text="1 + 2 = 3 . A: 3")
    printed = capsys.readouterr().out
    assert "pass@1 1.000" in printed and "styles {" not in printed
    assert "styles" not in json.loads(out.read_text())


def _tiny_random_llama():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_gift.demo import synthetic

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_temperature_0_is_greedy_decoding():
    """Every sample of a prompt is the argmax decoding (one sequence at a time, no cache)."""
    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.sampling import sample

    model, tokenizer = _tiny_random_llama()
    prompts = [prompt_ids(tokenizer, "Q: ( 1 + 2 ) * 3 = ?"), prompt_ids(tokenizer, "Q: 1 + 2 = ?")]
    out = sample(model, tokenizer, prompts * 3, 10, torch.Generator().manual_seed(0),
                 temperature=0)
    for i, prompt in enumerate(prompts):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
        greedy = ids[len(prompt):]
        assert out.tokens[i] == out.tokens[i + 2] == out.tokens[i + 4] == greedy
    assert all(v == 0 for row in out.logprobs + out.entropies for v in row)
    again = sample(model, tokenizer, prompts, 10, torch.Generator().manual_seed(1), temperature=0)
    assert again.tokens == out.tokens[:2]


def test_temperature_flag(scripted_command, capsys, tmp_path):
    out = tmp_path / "result.json"
    scripted_command([WORLD_RECORD], "--samples", "2", "--temperature", "0", "--out", str(out))
    assert "1 prompts x 2 samples at temperature 0 (greedy): pass@1 1.000" in (
        capsys.readouterr().out)
    assert json.loads(out.read_text())["temperature"] == 0
    assert _refused(capsys, scripted_command, "--temperature", "-0.5") == (
        "error: --temperature must be >= 0 (0: greedy decoding), got -0.5")


@pytest.mark.system
def test_evaluate_command_prints_no_upstream_warnings(tiny_world):
    """The command filters the known Transformer Engine/Apex/deprecation warnings (as the
    training launcher does) while it exports and loads a Megatron checkpoint."""
    from megatron_gift.platform import console

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gift.evaluate", "--load", tiny_world["base"], "--data",
         tiny_world["valid"], "--samples", "1", "--limit", "1", "--max-new-tokens", "4"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 prompts x 1 samples: pass@1" in result.stdout
    noise = [p for p, _ in console.KNOWN_WARNINGS] + list(console.QUIET_MESSAGES)
    assert [p for p in noise if p in result.stderr] == [], result.stderr[-3000:]
