"""``examples/reproduce/run.py --quick``: the whole study's pipeline end to end (data, base,
gates, preregistration, all six arm kinds through the engine, GRPO, evaluation, report), its
schema, and ``--report-only`` reading the run's own settings from ``results.json``; the
report's statistics against known values."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system  # examples/reproduce/run.py, as a program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "examples", "reproduce", "run.py")
ARMS = [("base-rl", "base -> RL"), ("sft", "SFT"), ("gift-low", "GIFT beta* - 3"),
        ("gift-star", "GIFT beta*"), ("gift-high", "GIFT beta* + 3"), ("soft-sft", "soft SFT")]


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, RUN, *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _check_units(results):
    assert [(a["name"], a["kind"]) for a in results["arms"]] == ARMS
    star = next(a for a in results["arms"] if a["name"] == "gift-star")
    assert star["beta"] == pytest.approx(results["calibration"]["beta_star"], abs=1e-4)
    soft = next(a for a in results["arms"] if a["name"] == "soft-sft")
    assert 0 <= soft["soft_sft_weight"] <= 1
    for arm in results["arms"]:
        assert [s["seed"] for s in arm["seeds"]] == [0]
        for seed in arm["seeds"]:
            after = seed["after_rl"]
            assert after["objective_pass@1"] == pytest.approx(
                (after["s0"]["pass@1"] + after["s1"]["pass@1"]) / 2)
            curve = [seed["before_rl"]["s1"]["pass@k"][str(k)] for k in range(1, 9)]
            assert curve == sorted(curve) and all(0 <= p <= 1 for p in curve)
            assert {"reward_s0", "reward_s1"} <= set(seed["rl_curve"][0])
            assert len(seed["rl_curve"]) == 2


@pytest.mark.slow
def test_quick_study_writes_preregistration_results_report_and_plots(tmp_path):
    out = tmp_path / "study"
    _run("--quick", "--out", str(out))
    for name in ("results.json", "report.md", "preregistration.md", "rl_reward.png",
                 "pass_at_k.png", "primary.png", "styles.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    study = results["study"]
    assert study["quick"] is True and len(study["code"]["commit"]) == 40
    assert isinstance(study["code"]["dirty"], bool)
    assert set(study["versions"]) == {"torch", "megatron-core", "transformers"}
    assert all(study["versions"].values())
    assert [set(run["gates"]) for run in results["gates"]] == [{"G1", "G2", "G3", "G4"}]
    assert results["gates_enforced"] is False  # --quick records the gates, changes no knob
    _check_units(results)
    assert results["decision"] in ("confirmed", "refuted", "inconclusive")
    assert results["decision"] == "inconclusive"  # one seed: no interval
    assert set(results["mechanism"]) == {"M1", "M2", "M3"}
    assert all(s["p_holm"] is None for s in results["secondary"])  # one seed: no test
    report, prereg = (out / "report.md").read_text(), (out / "preregistration.md").read_text()
    assert report.startswith(prereg) and results["preregistration"] == prereg
    assert study["code"]["commit"] in prereg and "## Decision" in report
    assert "![primary](primary.png)" in report

    # --report-only takes the settings from results.json, not from the command line (no
    # --quick here: the full study's five seeds would find no units).
    results["study"]["settings"]["rl"]["lr"] = 0.000123
    (out / "results.json").write_text(json.dumps(results))
    _run("--out", str(out), "--report-only")
    again = json.loads((out / "results.json").read_text())
    assert again["study"]["quick"] is True and again["study"]["settings"]["rl"]["lr"] == 0.000123
    assert '"lr": 0.000123' in (out / "report.md").read_text()


def test_statistics_against_known_values():
    sys.path.insert(0, os.path.join(ROOT, "examples", "reproduce"))
    from report import contrast, describe, holm, t_two_sided_p

    assert t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=2e-4)  # t table, df 4
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(0.0, 7) == pytest.approx(1.0)
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    flat = contrast([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])  # every seed +0.25: no variance
    assert flat["degenerate"] and flat["p"] is None
    assert "zero variance" in describe(flat) and "positive in 3/3" in describe(flat)
    spread = contrast([0.5, 0.7, 0.6, 0.9], [0.4, 0.5, 0.6, 0.5])
    assert not spread["degenerate"] and 0 < spread["p"] < 1 and "[" in describe(spread)


def test_sampling_and_scoring_share_the_real_vocab_of_a_padded_model():
    """A model whose output layer is wider than the tokenizer (padding columns with large
    logits): samples never name a padding column, and scoring normalises over the same columns
    as sampling (over all columns the log-probabilities would differ)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.demo.synthetic import build_tokenizer
    from megatron_gift.evaluation.sampling import real_vocab_size, sample, sequence_logprobs

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer) + 14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] *= 20  # padding columns that would win
    vocab = real_vocab_size(model, tokenizer)
    assert vocab == len(tokenizer) and real_vocab_size(model) == len(tokenizer) + 14
    prompts = [prompt_ids(tokenizer, "Q: ( 1 + 2 ) * 3 = ?")] * 6
    out = sample(model, tokenizer, prompts, 6, torch.Generator().manual_seed(0))
    assert all(0 <= t < vocab for seq in out.tokens for t in seq)
    with torch.no_grad():
        scored = sequence_logprobs(model, prompts, out.tokens, tokenizer.pad_token_id, vocab)
        everything = sequence_logprobs(model, prompts, out.tokens, tokenizer.pad_token_id)
    for drawn, same, wide in zip(out.logprobs, scored, everything):
        torch.testing.assert_close(torch.tensor(drawn), same, rtol=1e-5, atol=1e-5)
        assert (wide < same - 1e-3).all()
