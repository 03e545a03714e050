"""A run's metrics file read back: figures, a self-contained HTML page and a summary.

A run is its ``--save`` directory (which holds ``metrics.jsonl`` and, under ``configs/``, the
resolved config of each start) or a metrics file. The file holds one JSON object per logged
iteration (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, GIFT's diagnostics, ...) and one
per evaluation (``valid_*`` keys), each with its ``iteration``. A resumed run keeps one record
per iteration; should one appear twice, the later record counts.

Summaries give each metric's final value and its best one: the **highest** for a key that names
an accuracy, a pass rate, a match, a reward or a score (:data:`HIGHER_IS_BETTER`), the
**lowest** for everything else (losses, cross-entropies). NaN values are never best.

Wall time is the span between the first and the last record's timestamp where records carry
one (:data:`TIMESTAMP_KEYS`, Unix seconds); else the training steps' ``step_time`` summed (an
estimate, mean x iterations covered, where not every iteration is logged; evaluation and
checkpoint saves are not in it); else it is left out.
"""

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_gift.errors import MissingFileError, UserError

METRICS_FILE = "metrics.jsonl"
CONFIGS_DIR = "configs"
TIMESTAMP_KEYS = ("timestamp", "time")
# a metric whose name has one of these words (split at "_") is best at its maximum
HIGHER_IS_BETTER = ("accuracy", "acc", "pass", "match", "reward", "score")
# config keys that differ between any two runs and say nothing about the training
_CONFIG_NOISE = ("checkpoint.save", "checkpoint.load", "logging.")
VALID_PREFIX = "valid_"
# axis labels (with units) of the metrics the trainer writes; others are labelled by key
LABELS = {
    "loss": "loss (nats/token)",
    "lr": "learning rate",
    "grad_norm": "gradient norm (L2)",
    "tokens_per_s": "tokens/s",
    "target_mass": "target mass q(y*)",
    "student_entropy": "student entropy (nats)",
    "student_label_prob": "student p(y*)",
    "valid_ce": "valid cross-entropy (nats/token)",
    "valid_loss": "valid loss (nats/token)",
    "valid_accuracy": "valid next-token accuracy",
}


@dataclass(frozen=True)
class Panel:
    """One figure: ``keys`` against iteration, one axes per key (``valid``: every ``valid_*``
    key the runs hold)."""

    name: str  # the PNG's file stem
    title: str
    keys: tuple[str, ...] = ()
    valid: bool = False


PANELS = (
    Panel("loss", "Training loss", ("loss",)),
    Panel("validation", "Validation", valid=True),
    Panel("lr", "Learning rate", ("lr",)),
    Panel("grad_norm", "Gradient norm", ("grad_norm",)),
    Panel("tokens_per_s", "Throughput", ("tokens_per_s",)),
    Panel("gift", "GIFT diagnostics", ("target_mass", "student_entropy", "student_label_prob")),
)


@dataclass
class Run:
    """A run's records, split into training and evaluation records, each sorted by iteration."""

    name: str  # the label in legends and tables
    metrics_file: str
    train: list[dict]
    valid: list[dict]
    config: dict  # the newest resolved config under configs/ ({} where there is none)


@dataclass(frozen=True)
class MetricSummary:
    key: str
    final: float
    final_iteration: int
    best: Optional[float]  # None where every value is NaN
    best_iteration: Optional[int]
    higher_is_better: bool


@dataclass(frozen=True)
class RunSummary:
    name: str
    metrics_file: str
    iterations: int  # the last iteration any record names
    logged: int  # training records
    evaluations: int
    wall_time: Optional[tuple[float, str]]  # (seconds, how it was measured)
    metrics: tuple[MetricSummary, ...]  # loss first, then each valid_* key


@dataclass(frozen=True)
class Report:
    html: str  # path of report.html
    figures: dict[str, str]  # panel name -> PNG path (panels without data have none)
    summary: list[str]  # the text summary, as printed


# ----------------------------------------------------------------------------- reading


def metrics_file_of(run: str) -> str:
    """The metrics file of ``run`` (a save directory or the file itself)."""
    if os.path.isdir(run):
        path = os.path.join(run, METRICS_FILE)
        if not os.path.isfile(path):
            others = sorted(n for n in os.listdir(run) if n.endswith(".jsonl"))
            hint = f" (it has {', '.join(others)}: give that file)" if others else ""
            raise MissingFileError(
                f"{run}: no {METRICS_FILE} in this directory{hint}; give the run's --save "
                "directory, or the metrics file itself where the run wrote it elsewhere "
                "(--metrics-file)")
        return path
    if not os.path.exists(run):
        raise MissingFileError(
            f"{run}: no such run directory or metrics file; give a run's --save directory "
            f"(it holds {METRICS_FILE}) or its metrics file")
    return run


def read_records(path: str) -> list[dict]:
    """The JSON objects of the metrics file ``path``, in file order. A last line cut short (a
    run killed while writing it) is skipped; any other bad line is a :class:`UserError`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a metrics file (not UTF-8 text); give a run's "
                        f"{METRICS_FILE}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror}); check that it is a "
                        "readable file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(path, number, line, last=number == len(lines), first=not records)
        if record is not None:
            records.append(record)
    if not records:
        raise UserError(f"{path}: no metrics records (the file is empty); a run writes one per "
                        "logged iteration: report it once it has logged one")
    return records


def _parse(path: str, number: int, line: str, last: bool, first: bool) -> Optional[dict]:
    """The record on line ``number``; None for a last line cut short. ``first``: no record
    came before it (then a bad line means the file is not a metrics file at all)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if last and not line.endswith("\n") and not first:
            return None  # cut short by a kill: the run rewrites it on resume
        if first:
            raise UserError(f"{path}: not a metrics file (line {number} is not JSON: "
                            f"{error.msg}); give a run's --save directory or its "
                            f"{METRICS_FILE}") from None
        raise UserError(f"{path}:{number}: not JSON ({error.msg}); fix or delete that "
                        "line") from None
    if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
        raise UserError(f"{path}:{number}: not a metrics record (a JSON object with an integer "
                        "'iteration'); fix or delete that line")
    return record


def split_records(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, valid)``: records with training metrics and those with ``valid_*`` keys, each
    one per iteration (the later record wins) and sorted by iteration."""
    train, valid = {}, {}
    for record in records:
        keys = set(record) - {"iteration", *TIMESTAMP_KEYS}
        if any(k.startswith(VALID_PREFIX) for k in keys):
            valid[record["iteration"]] = record
        if any(not k.startswith(VALID_PREFIX) for k in keys):
            train[record["iteration"]] = record
    return ([train[i] for i in sorted(train)], [valid[i] for i in sorted(valid)])


def read_config(metrics_file: str) -> dict:
    """The newest resolved config in ``configs/`` beside ``metrics_file`` ({} where there is
    none or it cannot be read: the report is about the metrics)."""
    directory = os.path.join(os.path.dirname(os.path.abspath(metrics_file)), CONFIGS_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".yaml"))
    except OSError:
        return {}
    if not names:
        return {}
    import yaml

    try:
        with open(os.path.join(directory, names[-1]), encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_run(run: str, name: Optional[str] = None) -> Run:
    """Read the run ``run`` (a save directory or metrics file), labelled ``name``."""
    path = metrics_file_of(run)
    train, valid = split_records(read_records(path))
    return Run(name or run_names([path])[0], path, train, valid, read_config(path))


def read_runs(runs: Sequence[str]) -> list[Run]:
    """Read each of ``runs``; each is labelled by its directory name, made unique."""
    paths = [metrics_file_of(run) for run in runs]
    return [read_run(path, name) for path, name in zip(paths, run_names(paths))]


def run_names(metrics_files: Sequence[str]) -> list[str]:
    """A label per metrics file: its directory's name (the file's stem where it is not called
    ``metrics.jsonl``), with as many parent directories as tell equal names apart, then
    ``(2)``, ``(3)``, ... for the same file given twice."""
    paths = [os.path.abspath(path) for path in metrics_files]
    parts = {path: _name_parts(path) for path in paths}  # each file once
    depth = dict.fromkeys(parts, 1)
    while True:
        names = {path: "/".join(reversed(p[:depth[path]])) for path, p in parts.items()}
        taken = list(names.values())
        grow = [path for path, name in names.items()
                if taken.count(name) > 1 and depth[path] < len(parts[path])]
        if not grow:
            break
        for path in grow:
            depth[path] += 1
    seen: dict[str, int] = {}
    unique = []
    for path in paths:
        name = names[path]
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _name_parts(metrics_file: str) -> list[str]:
    """Path components, nearest first: the directory for ``metrics.jsonl``, else the stem."""
    path = os.path.abspath(metrics_file)
    directory, base = os.path.split(path)
    parts = [p for p in directory.split(os.sep) if p][::-1]
    if base != METRICS_FILE:
        parts.insert(0, os.path.splitext(base)[0])
    return parts or [base]


# ----------------------------------------------------------------------------- numbers


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """``(iterations, values)`` of ``key`` over ``records`` that hold a number for it."""
    points = [(r["iteration"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [i for i, _ in points], [v for _, v in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def higher_is_better(key: str) -> bool:
    """Whether ``key``'s best value is its maximum (accuracy-like names) or its minimum."""
    return any(word in HIGHER_IS_BETTER for word in key.lower().split("_"))


def summarize_metric(records: Sequence[dict], key: str) -> Optional[MetricSummary]:
    """Final and best value of ``key`` (None where no record holds it)."""
    iterations, values = series(records, key)
    if not values:
        return None
    finite = [(v, i) for i, v in zip(iterations, values) if not math.isnan(v)]
    higher = higher_is_better(key)
    best = (max if higher else min)(finite, key=lambda p: p[0]) if finite else (None, None)
    return MetricSummary(key, values[-1], iterations[-1], best[0], best[1], higher)


def valid_keys(runs: Sequence[Run]) -> list[str]:
    """The ``valid_*`` keys of ``runs``, in order of first appearance."""
    keys: dict[str, None] = {}
    for run in runs:
        for record in run.valid:
            keys.update((k, None) for k in record if k.startswith(VALID_PREFIX))
    return list(keys)


def wall_time(run: Run) -> Optional[tuple[float, str]]:
    """``(seconds, how)``: from the records' timestamps, else from ``step_time``; None where the
    records hold neither."""
    for key in TIMESTAMP_KEYS:
        _, stamps = series(run.train + run.valid, key)
        if len(stamps) > 1:
            return max(stamps) - min(stamps), f"first to last record's {key}"
    iterations, steps = series(run.train, "step_time")
    if not steps:
        return None
    gap = iterations[1] - iterations[0] if len(iterations) > 1 else 1
    covered = iterations[-1] - iterations[0] + gap
    if covered == len(steps):
        return sum(steps), "training steps: step_time summed"
    return (sum(steps) / len(steps) * covered,
            f"training steps: mean step_time x {covered} iterations")


def summarize(run: Run) -> RunSummary:
    """The numbers of :class:`RunSummary` for ``run``."""
    metrics = [summarize_metric(run.train, "loss")]
    metrics += [summarize_metric(run.valid, key) for key in valid_keys([run])]
    last = max(r["iteration"] for r in run.train + run.valid)
    return RunSummary(run.name, run.metrics_file, last, len(run.train), len(run.valid),
                      wall_time(run), tuple(m for m in metrics if m is not None))


def config_differences(runs: Sequence[Run]) -> dict[str, list[Any]]:
    """Config keys (dotted) whose values differ between the runs that have a config, with each
    run's value (None where it lacks the key or a config); {} for fewer than two configs."""
    flat = [_flatten(run.config) for run in runs]
    if sum(1 for f in flat if f) < 2:
        return {}
    keys = sorted({k for f in flat for k in f})
    differing = {}
    for key in keys:
        if any(key == noise or (noise.endswith(".") and key.startswith(noise))
               for noise in _CONFIG_NOISE):
            continue
        values = [f.get(key) for f in flat if f]
        if any(v != values[0] for v in values):
            differing[key] = [f.get(key) if f else None for f in flat]
    return differing


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------- text


def format_number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.5g}"


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _iterations_line(summary: RunSummary) -> str:
    line = (f"iterations {summary.iterations} ({summary.logged} logged, "
            f"{summary.evaluations} evaluations)")
    if summary.wall_time is not None:
        seconds, how = summary.wall_time
        line += f"; wall time {format_duration(seconds)} ({how})"
    return line


def summary_table(summary: RunSummary) -> list[str]:
    """A run's summary as text lines: iterations, wall time, then final and best per metric."""
    width = max([len("metric")] + [len(m.key) for m in summary.metrics])
    lines = [f"{summary.name}  ({summary.metrics_file})", "  " + _iterations_line(summary),
             f"  {'metric':{width}s}  {'final':>10s} {'@iter':>7s}  {'best':>10s} "
             f"{'@iter':>7s}  best is"]
    for m in summary.metrics:
        lines.append(f"  {m.key:{width}s}  {format_number(m.final):>10s} "
                     f"{m.final_iteration:>7d}  {format_number(m.best):>10s} "
                     f"{'-' if m.best_iteration is None else m.best_iteration:>7}  "
                     f"{'highest' if m.higher_is_better else 'lowest'}")
    return lines


def summary_text(runs: Sequence[Run]) -> list[str]:
    """Every run's :func:`summary_table`, then the config keys that differ between them."""
    lines = []
    for run in runs:
        lines += summary_table(summarize(run)) + [""]
    differences = config_differences(runs)
    if differences:
        lines.append("config differences: " + "; ".join(
            f"{key} " + " / ".join(f"{run.name}={value}" for run, value in zip(runs, values))
            for key, values in differences.items()))
    return lines


def run_summary(metrics_file: str) -> list[str]:
    """A few lines for the end of a run: iterations and wall time, then the final and best
    training loss and validation values. Raises :class:`UserError` on a missing, unreadable or
    empty file."""
    summary = summarize(read_run(metrics_file))
    lines = [_iterations_line(summary)]
    for m in summary.metrics:
        best = "-" if m.best is None else (
            f"{format_number(m.best)} (iteration {m.best_iteration}, "
            f"{'highest' if m.higher_is_better else 'lowest'})")
        lines.append(f"{m.key}: final {format_number(m.final)} (iteration "
                     f"{m.final_iteration}), best {best}")
    return lines


# ----------------------------------------------------------------------------- figures


def panel_keys(runs: Sequence[Run], panel: Panel) -> list[str]:
    """The keys ``panel`` draws for ``runs``: those some run holds a number for."""
    keys = valid_keys(runs) if panel.valid else list(panel.keys)
    return [k for k in keys if any(series(_records(run, panel), k)[1] for run in runs)]


def _records(run: Run, panel: Panel) -> list[dict]:
    return run.valid if panel.valid else run.train


def build_figure(runs: Sequence[Run], panel: Panel):
    """A matplotlib ``Figure`` (Agg canvas, no display) of ``panel``: one axes per key, each
    run a line labelled by its name (colour by run order); None where no run has the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = panel_keys(runs, panel)
    if not keys:
        return None
    figure = Figure(figsize=(5.2 * len(keys), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for index, run in enumerate(runs):
            x, y = series(_records(run, panel), key)
            if x:
                ax.plot(x, y, label=run.name, color=f"C{index % 10}",
                        linestyle=("-", "--", ":", "-.")[index // 10 % 4],
                        marker="o" if panel.valid or len(x) < 2 else None, markersize=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel(LABELS.get(key, key))
        if len(keys) > 1:
            ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(panel.title)
    return figure


def write_figures(runs: Sequence[Run], out: str) -> dict[str, str]:
    """One PNG per panel with data, ``out/<panel>.png``; returns panel name -> path."""
    figures = {}
    for panel in PANELS:
        figure = build_figure(runs, panel)
        if figure is not None:
            path = os.path.join(out, f"{panel.name}.png")
            _write_replacing(path, lambda tmp: figure.savefig(tmp, format="png"))
            figures[panel.name] = path
    return figures


# ----------------------------------------------------------------------------- HTML

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}"
          "table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block}")


def html_page(runs: Sequence[Run], figures: dict[str, str]) -> str:
    """The report as one HTML document: the runs, a summary table (one row per run), the config
    keys that differ, and each figure embedded as a base64 PNG data URI."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             "<title>megatron-gift report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>megatron-gift report</h1>", "<h2>Runs</h2>", "<ul>"]
    parts += [f"<li><b>{html.escape(run.name)}</b>: {html.escape(run.metrics_file)}</li>"
              for run in runs]
    parts += ["</ul>", "<h2>Summary</h2>", _html_summary(runs),
              "<p>Best: the lowest value for losses and cross-entropies, the highest for "
              "accuracy-like metrics (names with accuracy, acc, pass, match, reward or score). "
              "Wall time: from the records' timestamps, else the training steps' "
              "step_time (evaluation and saves not included).</p>"]
    parts += _html_config(runs)
    for panel in PANELS:
        if panel.name in figures:
            parts += [f"<h2>{html.escape(panel.title)}</h2>",
                      f"<img alt=\"{panel.name}\" src=\"{png_data_uri(figures[panel.name])}\">"]
    parts.append("</body></html>")
    return "\n".join(parts)


def png_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _html_summary(runs: Sequence[Run]) -> str:
    summaries = [summarize(run) for run in runs]
    keys = list(dict.fromkeys(m.key for s in summaries for m in s.metrics))
    head = ["run", "iterations", "wall time"]
    for key in keys:
        head += [f"{key} final", f"{key} best ({'max' if higher_is_better(key) else 'min'})"]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for s in summaries:
        by_key = {m.key: m for m in s.metrics}
        cells = [s.name, str(s.iterations),
                 format_duration(s.wall_time[0]) if s.wall_time else "-"]
        for key in keys:
            m = by_key.get(key)
            cells += ["-", "-"] if m is None else [
                format_number(m.final),
                f"{format_number(m.best)} @ {'-' if m.best_iteration is None else m.best_iteration}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _html_config(runs: Sequence[Run]) -> list[str]:
    differences = config_differences(runs)
    if not differences:
        return []
    head = "<tr><th>config key</th>" + "".join(
        f"<th>{html.escape(run.name)}</th>" for run in runs) + "</tr>"
    rows = [f"<tr><td>{html.escape(key)}</td>" + "".join(
        f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"
        for key, values in differences.items()]
    return ["<h2>Config differences</h2>", "<table>" + head + "".join(rows) + "</table>"]


# ----------------------------------------------------------------------------- the report


def write_report(runs: Sequence[str], out: str) -> Report:
    """Read ``runs`` (save directories or metrics files) and write ``out/<panel>.png`` and
    ``out/report.html`` (self-contained); returns the paths and the text summary."""
    read = read_runs(runs)
    _make_directory(out)
    try:
        figures = write_figures(read, out)
        page = os.path.join(out, "report.html")
        text = html_page(read, figures)
        _write_replacing(page, lambda tmp: _write_text(tmp, text))
    except OSError as error:
        raise UserError(f"--out {out}: cannot write the report there ({error.strerror}); give "
                        "a writable directory") from None
    return Report(page, figures, summary_text(read))


REPORT_FILES = frozenset({"report.html", *(f"{panel.name}.png" for panel in PANELS)})


def _write_replacing(path: str, write) -> None:
    """``write(tmp)`` beside ``path``, then rename it into place: a killed report leaves the
    previous file whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _make_directory(out: str) -> None:
    """Create ``out``; one that holds anything but an earlier report is refused (a report never
    writes over other files)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: a file is there; give a directory (it is created)")
    others = sorted(set(os.listdir(out)) - REPORT_FILES) if os.path.isdir(out) else []
    if others:
        raise UserError(f"--out {out} holds other files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); give an empty directory or one "
                        "an earlier report wrote")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create it ({error.strerror}); give a writable "
                        "directory") from None
