"""``megatron-gift report``: metrics files written by hand (two runs) read back, drawn, embedded in
one HTML page and summarised; the summary's numbers against those computed from the records;
bad runs are one line and exit status 2; the end-of-run summary (``run_summary``)."""

import base64
import io
import json
import math
import os
import re

import pytest
from PIL import Image

from megatron_gift.errors import UserError
from megatron_gift.tracking import report
from support.commands import run_main

# (loss per iteration 1..10, {iteration: (valid_ce, valid_accuracy)}, gift.beta): the best loss
# is neither the first nor the last, the best accuracy of "sft" is not its final one
RUNS = {
    "sft": ([2.0, 1.7, 1.9, 1.2, 1.5, 1.4, 1.3, 1.1, 1.6, 1.25],
            {5: (1.5, 0.6), 10: (1.6, 0.55)}, ".inf"),
    "gift": ([2.1, 1.8, 1.6, 1.5, 1.45, 1.3, 1.35, 1.2, 1.15, 1.18],
             {5: (1.4, 0.5), 10: (1.3, 0.7)}, "2.0"),
}
STEP_TIME = 0.25  # seconds


def _records(losses, evaluations):
    """Records as the trainer writes them: one per iteration, one per evaluation after it."""
    records = []
    for iteration, loss in enumerate(losses, 1):
        records.append({"loss": loss, "student_entropy": 1.0 + loss / 10, "target_mass": 0.7,
                        "student_label_prob": 0.5 + iteration / 100, "lr": 1e-3 * iteration,
                        "grad_norm": 1.0 + (iteration % 3), "tokens": 768, "loss_tokens": 300,
                        "step_time": STEP_TIME, "tokens_per_s": 768 / STEP_TIME,
                        "loss_tokens_per_s": 300 / STEP_TIME, "iteration": iteration})
        if iteration in evaluations:
            ce, accuracy = evaluations[iteration]
            records.append({"iteration": iteration, "valid_ce": ce, "valid_accuracy": accuracy})
    return records


def _write_metrics(path, records, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


@pytest.fixture
def runs(tmp_path):
    """Two save directories, ``sft`` and ``gift``, each with metrics.jsonl and configs/."""
    directories = []
    for name, (losses, evaluations, beta) in RUNS.items():
        directory = tmp_path / "runs" / name
        _write_metrics(str(directory / "metrics.jsonl"), _records(losses, evaluations))
        (directory / "configs").mkdir()
        (directory / "configs" / "start-0000000-20250101-000000.yaml").write_text(
            f"gift:\n  beta: {beta}\noptimizer:\n  lr: 0.001\n"
            f"checkpoint:\n  save: {directory}\n")
        directories.append(str(directory))
    return directories


def _report(*args):
    from megatron_gift.commands.report import main

    return run_main(main, args)


def test_the_report_writes_pngs_and_one_page_that_embeds_them_and_lists_both_runs(runs,
                                                                                   tmp_path):
    out = tmp_path / "report"
    result = _report(*runs, "--out", out)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"report.html"} | {f"{p.name}.png" for p in report.PANELS}
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(report.PANELS)
    for panel in report.PANELS:
        data = (out / f"{panel.name}.png").read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()
        assert base64.b64encode(data).decode() in embedded
    assert "<img" in page and 'src="data:' in page and "src=\"/" not in page  # self-contained
    for name in RUNS:
        assert f"<b>{name}</b>" in page and f"<td>{name}</td>" in page
    assert "<td>gift.beta</td><td>inf</td><td>2.0</td>" in page  # configs/ read
    assert f"report: {out / 'report.html'}" in result.stdout


def _expected(losses, evaluations):
    """Final and best of each metric, from the test's own numbers: (final, final iteration,
    best, best iteration)."""
    loss_best = min(range(len(losses)), key=lambda i: losses[i])
    expected = {"loss": (losses[-1], len(losses), losses[loss_best], loss_best + 1)}
    iterations = sorted(evaluations)
    ce_best = min(iterations, key=lambda i: evaluations[i][0])
    accuracy_best = max(iterations, key=lambda i: evaluations[i][1])
    expected["valid_ce"] = (evaluations[iterations[-1]][0], iterations[-1],
                            evaluations[ce_best][0], ce_best)
    expected["valid_accuracy"] = (evaluations[iterations[-1]][1], iterations[-1],
                                  evaluations[accuracy_best][1], accuracy_best)
    return expected


def test_the_summary_holds_the_final_and_best_values_of_the_records(runs, tmp_path):
    """Best: lowest loss and cross-entropy, highest accuracy; printed per run too."""
    for directory, (name, (losses, evaluations, _)) in zip(runs, RUNS.items()):
        summary = report.summarize(report.read_run(directory))
        assert summary.name == name
        assert (summary.iterations, summary.logged, summary.evaluations) == (10, 10, 2)
        assert summary.wall_time == (pytest.approx(10 * STEP_TIME),
                                     "training steps: step_time summed")
        got = {m.key: (m.final, m.final_iteration, m.best, m.best_iteration)
               for m in summary.metrics}
        assert got == _expected(losses, evaluations)
    printed = _report(*runs, "--out", tmp_path / "out").stdout
    losses = RUNS["sft"][0]
    assert re.search(rf"loss +{losses[-1]:.5g} +10 +{min(losses):.5g} +8 +lowest", printed)
    assert re.search(r"valid_accuracy +0.55 +10 +0.6 +5 +highest", printed)
    assert "config differences: gift.beta sft=inf / gift=2.0" in printed


def test_the_loss_figure_overlays_both_runs_labelled_by_name(runs):
    read = report.read_runs(runs)
    panel = next(p for p in report.PANELS if p.name == "loss")
    figure = report.build_figure(read, panel)
    (ax,) = figure.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == list(RUNS)
    for line, (losses, _, _) in zip(lines, RUNS.values()):
        assert list(line.get_xdata()) == list(range(1, 11))
        assert list(line.get_ydata()) == losses
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(RUNS)
    assert lines[0].get_color() != lines[1].get_color()


def test_the_validation_and_gift_figures_have_one_axes_per_metric(runs):
    read = report.read_runs(runs)
    panels = {p.name: p for p in report.PANELS}
    validation = report.build_figure(read, panels["validation"])
    assert [ax.get_title() for ax in validation.axes] == ["valid_ce", "valid_accuracy"]
    accuracy = validation.axes[1].get_lines()
    assert [list(line.get_ydata()) for line in accuracy] == [
        [e[1] for e in evaluations.values()] for _, evaluations, _ in RUNS.values()]
    gift = report.build_figure(read, panels["gift"])
    assert [ax.get_title() for ax in gift.axes] == ["target_mass", "student_entropy",
                                                    "student_label_prob"]
    assert all(len(ax.get_lines()) == 2 for ax in gift.axes)


def test_a_panel_without_data_has_no_figure(tmp_path):
    path = str(tmp_path / "no-eval" / "metrics.jsonl")
    _write_metrics(path, _records([1.0, 0.9], {}))
    read = report.read_runs([path])
    assert report.build_figure(read, report.PANELS[1]) is None  # validation
    figures = report.write_figures(read, str(tmp_path))
    assert "validation" not in figures and "loss" in figures


def test_a_resumed_run_and_a_last_line_cut_short(tmp_path):
    """A record written twice counts once (the later one); a kill mid-line leaves a last line
    without its newline, which is skipped."""
    records = _records([2.0, 1.5, 1.4], {})
    again = dict(records[1], loss=1.6)
    path = str(tmp_path / "resumed" / "metrics.jsonl")
    _write_metrics(path, records + [again], tail='{"loss": 1.3, "iter')
    run = report.read_run(os.path.dirname(path))
    assert [r["iteration"] for r in run.train] == [1, 2, 3]
    assert report.series(run.train, "loss") == ([1, 2, 3], [2.0, 1.6, 1.4])


def test_run_names_tell_equal_directory_names_apart(tmp_path):
    paths = [str(tmp_path / "a" / "gift" / "metrics.jsonl"),
             str(tmp_path / "b" / "gift" / "metrics.jsonl"),
             str(tmp_path / "sft" / "metrics.jsonl"),
             str(tmp_path / "base_metrics.jsonl")]
    assert report.run_names(paths) == ["a/gift", "b/gift", "sft", "base_metrics"]
    assert report.run_names([paths[2], paths[2]]) == ["sft", "sft (2)"]


def test_best_is_the_lowest_except_for_accuracy_like_metrics():
    assert not any(map(report.higher_is_better, ["loss", "valid_ce", "valid_loss", "grad_norm"]))
    assert all(map(report.higher_is_better, ["valid_accuracy", "valid_acc", "pass_at_1"]))
    records = [{"iteration": 1, "loss": math.nan}, {"iteration": 2, "loss": 3.0},
               {"iteration": 3, "loss": 4.0}]
    summary = report.summarize_metric(records, "loss")
    assert (summary.best, summary.best_iteration, summary.final) == (3.0, 2, 4.0)  # NaN never best


def test_wall_time_from_timestamps_else_step_time_else_none(tmp_path):
    def wall(records):
        return report.wall_time(report.Run("r", "m", *report.split_records(records), {}))

    timed = [{"iteration": i, "loss": 1.0, "step_time": 0.5, "timestamp": 1000.0 + 3 * i}
             for i in (1, 2, 3)]
    assert wall(timed) == (6.0, "first to last record's timestamp")
    stepped = [{"iteration": i, "loss": 1.0, "step_time": 0.5} for i in (10, 20, 30)]
    assert wall(stepped) == (15.0, "training steps: mean step_time x 30 iterations")
    assert wall([{"iteration": 1, "loss": 1.0}]) is None


def test_run_summary_lines(runs):
    losses, evaluations, _ = RUNS["sft"]
    lines = report.run_summary(os.path.join(runs[0], "metrics.jsonl"))
    assert lines == [
        "iterations 10 (10 logged, 2 evaluations); wall time 2.5 s (training steps: step_time "
        "summed)",
        f"loss: final {losses[-1]} (iteration 10), best {min(losses)} (iteration 8, lowest)",
        "valid_ce: final 1.6 (iteration 10), best 1.5 (iteration 5, lowest)",
        "valid_accuracy: final 0.55 (iteration 10), best 0.6 (iteration 5, highest)"]
    with pytest.raises(UserError, match="no such run directory or metrics file"):
        report.run_summary(os.path.join(runs[0], "missing.jsonl"))


@pytest.mark.parametrize("case", ["missing", "no metrics in directory", "empty", "bad line",
                                  "not metrics", "out is a file"])
def test_a_bad_run_is_one_line_naming_it_and_exit_status_2(case, runs, tmp_path):
    run, out = runs[0], tmp_path / "out"
    if case == "missing":
        run, expected = str(tmp_path / "nowhere"), "no such run directory or metrics file"
    elif case == "no metrics in directory":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "base_metrics.jsonl").write_text("")
        run, expected = str(tmp_path / "other"), "it has base_metrics.jsonl: give that file"
    elif case == "empty":
        run, expected = str(tmp_path / "empty.jsonl"), "no metrics records"
        open(run, "w").close()
    elif case == "bad line":
        run, expected = str(tmp_path / "bad.jsonl"), "bad.jsonl:2: not JSON"
        _write_metrics(run, _records([1.0], {}), tail="{oops\n" + json.dumps(_records(
            [1.0, 2.0], {})[1]) + "\n")
    elif case == "not metrics":
        run = os.path.join(runs[0], "configs", "start-0000000-20250101-000000.yaml")
        expected = "not a metrics file"
    else:
        out.write_text("")
        expected = "a file is there; give a directory"
    result = _report(runs[1], run, "--out", out)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert expected in result.stderr and (str(out) if case == "out is a file" else run) in \
        result.stderr
    assert case == "out is a file" or not out.exists()  # nothing written


def test_a_run_ends_with_its_summary_and_the_command_that_draws_it(tiny_world, tmp_path, capfd):
    """The trainer's last lines (rank 0): the summary of its metrics file, then the report
    command for its save directory."""
    from support.parallel_harness import TINY_MODEL, train_here

    save = tmp_path / "run"
    train_here({"model": dict(TINY_MODEL), "data": {"train_path": tiny_world["demos"],
                                                     "valid_path": tiny_world["valid"]},
                "training": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 4,
                             "eval_interval": 2, "eval_iters": 1},
                "gift": {"beta": 3.0}, "logging": {"progress": False},
                "checkpoint": {"pretrained_checkpoint": tiny_world["base"], "save": str(save)}})
    out = capfd.readouterr().out
    expected = report.run_summary(str(save / "metrics.jsonl"))
    assert expected[0].startswith("iterations 2") and any(l.startswith("valid_ce:") for l in expected)
    tail = [line.removeprefix("[gift] ") for line in out.strip().splitlines()[-len(expected) - 1:]]
    assert tail == expected + [f"draw it: megatron-gift report {save} --out {save}/report"]


def test_a_report_replaces_an_earlier_one_and_never_writes_over_other_files(runs, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "report"
    report.write_report(runs, str(out))
    first = (out / "report.html").read_text()
    report.write_report(runs, str(out))  # again over itself: the trainer suggests just that
    assert (out / "report.html").read_text() == first
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"--out {out} holds other files \(notes.txt\)"):
        report.write_report(runs, str(out))
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").read_text() == first
    (out / "notes.txt").unlink()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill while the page is written

    monkeypatch.setattr(report, "_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(runs, str(out))
    assert (out / "report.html").read_text() == first
    assert sorted(os.listdir(out)) == sorted(p for p in report.REPORT_FILES
                                             if (out / p).exists())  # no temporary left
