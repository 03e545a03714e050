"""examples/gpu/check.py, run tiny on CPU (``--quick --device cpu``): its rows, the rows it
cannot run, and a failed row turning into exit status 1."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.system  # examples/gpu/check.py, as a program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "examples", "gpu", "check.py")


@pytest.mark.slow
def test_the_check_runs_its_rows_on_cpu_and_names_what_it_cannot_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, CHECK, "--quick", "--device", "cpu", "--skip",
                             "step", "--out", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["check"]: row for row in json.load(open(tmp_path / "check.json"))["rows"]}
    for implementation in ("triton", "eager"):
        for dtype in ("float32", "bfloat16"):
            assert rows[f"loss oracle, {implementation}, {dtype}"]["status"] == "ok"
        assert rows[f"loss speed, {implementation}, V=4096"]["status"] == "ok"
    for row in ("exact", "memory", "time"):
        assert rows[f"fused head, {row}, V=4096"]["status"] == "ok", rows
    tail = rows["reference tail, bf16 vs fp32 (default job's base, beta 20)"]
    assert tail["status"] == "ok", tail
    shift = json.load(open(tmp_path / "reference-tail.json"))
    assert shift["tokens"] > 0 and 0 <= shift["mean_abs_dlogp"] <= shift["max_abs_dlogp"]
    resume = rows["resume, distributed optimizer + overlapped gather (saved at 2, losses 3-4)"]
    assert resume["status"] == "not run" and "needs CUDA" in resume["detail"]
    te_rows = [row for name, row in rows.items() if "TE" in name or "FP8" in name]
    assert te_rows and all(row["status"] == "not run" and "Transformer Engine" in row["detail"]
                           for row in te_rows)
    assert "status" in result.stdout and "not run" in result.stdout


def test_a_wrong_loss_fails_its_row_and_the_exit_status(monkeypatch, tmp_path):
    sys.path.insert(0, os.path.dirname(CHECK))
    import check

    from megatron_gift.loss import gift

    real = gift.vocab_parallel_gift_loss

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr("megatron_gift.loss.vocab_parallel_gift_loss", off_by_a_little)
    rows = check.loss_oracle_rows(torch.device("cpu"), True)
    eager = [row for row in rows if "eager" in row.check]
    assert eager and all(row.status == "FAILED" for row in eager)
    # Only the loss rows: the others are the first test's.
    monkeypatch.setattr(sys, "argv", [CHECK, "--quick", "--device", "cpu", "--skip", "speed",
                                      "head", "step", "tail", "resume", "--out", str(tmp_path)])
    assert check.main() == 1


def test_a_wrong_fused_head_fails_its_row(monkeypatch, world_of_one):
    """In this process's one-rank world (the fixture's, taken down after): the rows' own
    would stay up and refuse the next test's."""
    sys.path.insert(0, os.path.dirname(CHECK))
    import check

    from megatron_gift.loss import fused_head

    real = fused_head.fused_gift_head_loss
    rows = check.fused_head_rows(torch.device("cpu"), True)
    assert rows[0].check == "fused head, exact, V=4096" and rows[0].status == "ok", rows[0]
    monkeypatch.setattr(fused_head, "fused_gift_head_loss",
                        lambda *args, **kwargs: real(*args, **kwargs) * (1 + 1e-2))
    assert check.fused_head_rows(torch.device("cpu"), True)[0].status == "FAILED"
