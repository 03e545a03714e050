"""Sampling and scoring a checkpoint (``python -m megatron_gift.evaluate``), its metrics, and the
reproduction study's arithmetic-chain world."""

import itertools
import json
import math
import random

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
    from megatron_gift.data import chains, synthetic

    for seed in range(50):
        assert chains.chain_problem(random.Random(seed), 2) == synthetic.problem(random.Random(seed))


def test_chain_styles_and_answers():
    from megatron_gift.data import chains
    from megatron_gift.data.synthetic import answer_of

    prompt, responses = chains.chain_problem(random.Random(3), 3)
    assert prompt == "Q: ( ( 4 * 9 ) - 3 ) * 6 = ?"
    assert responses["stepwise"] == "4 * 9 = 36 , 36 - 3 = 33 , 33 * 6 = 198 . A: 198"
    assert responses["backward"] == "33 * 6 = 198 where 36 - 3 = 33 where 4 * 9 = 36 . A: 198"
    assert responses["compact"] == "( 36 ) - 3 = 33 , ( 33 ) * 6 = 198 . A: 198"
    for style, text in responses.items():
        assert chains.classify_style(text) == style and answer_of(text) == "198"
    assert chains.classify_style("7 7 .") == "other"


def test_token_kinds():
    from megatron_gift.evaluate import token_kinds

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
    from megatron_gift.evaluate import main

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
    from megatron_gift.evaluate import evaluate_policy
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
    from megatron_gift.evaluate import read_records

    with pytest.raises(SystemExit, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(SystemExit, match="no field"):
        read_records(str(bad))


def test_checkers():
    from megatron_gift.evaluate import checker_for

    answer, math_ = checker_for("answer"), checker_for("math")
    assert answer("3 + 4 = 7 . A: 1 4", "14") and not answer("A: 15", "14") and not answer("14", "14")
    assert math_("so the answer is $\\frac{1}{2}$", "0.5") and not math_("the answer is 3", "0.5")
