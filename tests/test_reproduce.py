"""``examples/reproduce/run.py --quick``: the whole study's pipeline end to end (base, SFT and
one GIFT arm through the engine, GRPO, evaluation, report), checking files and schema."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system  # examples/reproduce/run.py, as a program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_study_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "reproduce", "run.py"),
                             "--quick", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("results.json", "report.md", "rl_reward.png", "pass_at_k.png", "beta_sweep.png",
                 "post_training_entropy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["verdict"], str) and "SFT" in results["verdict"]
    assert [(a["name"], a["beta"]) for a in results["arms"]] == [("sft", "inf"), ("gift-beta2", 2.0)]
    for arm in results["arms"]:
        assert [s["seed"] for s in arm["seeds"]] == [0]
        for seed in arm["seeds"]:
            for stage in ("before_rl", "after_rl"):
                metrics = seed[stage]
                curve = [metrics["pass@k"][str(k)] for k in range(1, 9)]
                assert metrics["pass@1"] == curve[0] and curve == sorted(curve)
                assert all(0 <= p <= 1 for p in curve)
                assert set(metrics["ood"]["pass@k"]) == {str(k) for k in range(1, 9)}
                for key in ("entropy", "kl_to_reference", "styles"):
                    assert key in metrics and key in metrics["ood"]
            assert len(seed["rl_curve"]) == 3 and all(0 <= r <= 1 for r in seed["rl_curve"])
            assert len(seed["post_training"]["student_entropy"]) == 6
    comparison = results["comparisons"][0]
    assert comparison["arm"] == "gift-beta2" and comparison["vs"] == "sft"
    assert comparison["after_rl"]["pass@1"]["n"] == 1
    assert set(results["gift_tokens"]["beta"]) == {"1", "2", "5", "10", "20", "50"}
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "![beta_sweep](beta_sweep.png)" in report
    assert (out / "work").is_dir()  # checkpoints stay in the scratch folder
