"""The study's outputs: ``results.json``, ``report.md`` and the plots, from the per-run files."""

import json
import math
import os
import platform

from megatron_gift.evaluation.metrics import mean_ci, paired_difference

# (label, stage key path) of the metrics summarised per arm and compared with SFT.
METRICS = [
    ("pass@1", ("pass@1",)), ("pass@4", ("pass@k", "4")), ("pass@16", ("pass@k", "16")),
    ("ood pass@1", ("ood", "pass@1")), ("ood pass@16", ("ood", "pass@k", "16")),
    ("entropy", ("entropy",)), ("style entropy (bits)", ("styles", "entropy_bits")),
    ("correct styles / prompt", ("styles", "distinct_correct_styles")),
    ("stepwise share", ("styles", "shares", "stepwise")),
    ("KL to base", ("kl_to_reference",)),
]
DESIGN = """\
## Design (fixed before any arm was compared)

* **World** (`megatron_gift/data/chains.py`): arithmetic chains on digits 1-9, e.g.
  `Q: ( 3 + 4 ) * 2 = ?`, solved in three styles (stepwise, backward, compact) that state every
  intermediate result; two-step chains are exactly the embedded default world's problems. The
  base is pretrained on solutions in all three styles, a quarter of them three-step chains.
* **In distribution** (ID): 200 distinct two-step prompts. **Out of distribution** (OOD): 200
  distinct three-step prompts; the base saw such chains, post-training and RL never do.
* **Post-training** data: 2000 two-step demonstrations in the stepwise style only (as the
  default job). Every arm: same base, data, steps, batch and learning rate; only beta differs.
* **Betas**: GIFT moves the target away from one-hot only on tokens where the base gives the
  demonstrated token little probability (`q(y*) = p e^b / (1 - p + p e^b)`). Measured on the
  embedded default job's base before this study: q(y*) < 0.5 on 16% of demonstrated tokens at
  beta = 2 and on none at beta >= 5 (this study's base: the table "Where GIFT differs from SFT"
  below). The paper's beta = 20 was set for 150k-token vocabularies where the base gives many
  demonstrated tokens ~1e-8; with a 30-token vocabulary the interesting range is lower. The sweep
  therefore spans 1, 2, 5 and 20 (20 as the paper's default, expected to behave as SFT).
* **Base size**: 1200 pretraining steps, chosen from a pilot on the base alone (600 steps left
  it at ~10% pass@1, where GRPO at any learning rate tried did not raise the reward); RL
  learning rate 1e-4 and 100 steps from a pilot SFT run with an unused seed (99): at 1e-3 GRPO
  collapsed to reward 0 from the weak base; at 1e-4 the pilot's pass@1 rose. No GIFT arm was run
  before the settings were fixed.
* **RL**: GRPO of our own in plain PyTorch (`examples/reproduce/grpo.py`; TRL's trainer is far
  slower at this size), group 8, KL 0, reward 1 for a right final answer, identical settings and
  prompt stream for every arm.
* **Seeds**: one base model (as the paper); a seed sets the post-training data order and the RL
  prompts and samples. Intervals are 95% Student-t over seeds; GIFT - SFT is paired by seed.
  With 3 seeds the t quantile is 4.30, so only large effects reach significance.
* Prompts are encoded at every stage as the trainer encodes prompt/response records
  (`megatron_gift.data.formatting.prompt_ids`), so the base is pretrained on prompt/response
  records too (loss on the solution).
"""


def get(stage, path):
    value = stage
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def summarise(seeds, stage):
    out = {}
    for label, path in METRICS:
        values = [get(s[stage], path) for s in seeds]
        if all(v is not None for v in values):
            out[label] = mean_ci(values)
    return out


def load_arms(work, settings):
    arms = []
    for name, beta in settings["arms"]:
        seeds = []
        for seed in settings["seeds"]:
            with open(os.path.join(work, "units", f"{name}-s{seed}", "result.json")) as f:
                seeds.append(json.load(f))
        arms.append({"name": name, "beta": beta, "seeds": seeds,
                     "summary": {"before_rl": summarise(seeds, "before_rl"),
                                 "after_rl": summarise(seeds, "after_rl"),
                                 "final_rl_reward": mean_ci([sum(s["rl_curve"][-5:]) / len(s["rl_curve"][-5:])
                                                             for s in seeds])}})
    return arms


def compare(arms):
    sft = next(a for a in arms if a["beta"] == "inf")
    comparisons = []
    for arm in arms:
        if arm is sft:
            continue
        entry = {"arm": arm["name"], "beta": arm["beta"], "vs": sft["name"]}
        for stage in ("before_rl", "after_rl"):
            entry[stage] = {}
            for label, path in METRICS[:5]:
                a = [get(s[stage], path) for s in arm["seeds"]]
                b = [get(s[stage], path) for s in sft["seeds"]]
                if None not in a + b:
                    entry[stage][label] = paired_difference(a, b)
        comparisons.append(entry)
    return comparisons


def _diff(d):
    return f"{d['mean']:+.3f} (95% CI {d['low']:+.3f} to {d['high']:+.3f}, {d['wins']}/{d['n']} seeds higher)"


def verdict(arms, comparisons):
    """``(headline, findings)``: plain sentences computed from the numbers alone."""
    sft = next(a for a in arms if a["beta"] == "inf")
    gift = [a for a in arms if a["beta"] != "inf"]
    s = sft["summary"]["after_rl"]
    findings = [f"After RL, SFT reaches pass@1 {s['pass@1']['mean']:.3f} in distribution and "
                f"{s['ood pass@1']['mean']:.3f} out of distribution."]
    better, worse = set(), set()
    for c in comparisons:
        parts = []
        for label in ("pass@1", "ood pass@1"):
            d = c["after_rl"][label]
            parts.append(f"{label} {_diff(d)}")
            if d["n"] > 1 and d["low"] > 0:
                better.add(c["arm"])
            if d["n"] > 1 and d["high"] < 0:
                worse.add(c["arm"])
        findings.append(f"After RL, {c['arm']} - SFT: " + "; ".join(parts) + ".")
    for c in comparisons:
        b = c["before_rl"]
        top = max((label for label in b if label.startswith("pass@") and label != "pass@1"),
                  key=lambda label: int(label[5:]))
        ood_top = "ood " + top if "ood " + top in b else None
        arm = next(a for a in gift if a["name"] == c["arm"])
        styles = (arm["summary"]["before_rl"]["style entropy (bits)"]["mean"],
                  sft["summary"]["before_rl"]["style entropy (bits)"]["mean"])
        findings.append(f"Before RL, {c['arm']} - SFT: pass@1 {_diff(b['pass@1'])}; {top} "
                        f"{_diff(b[top])}" + (f"; {ood_top} {_diff(b[ood_top])}" if ood_top else "")
                        + f"; style entropy {styles[0]:.2f} vs {styles[1]:.2f} bits.")
    after = [(a["beta"], a["summary"]["after_rl"]["pass@1"]["mean"]) for a in gift]
    best = max(after, key=lambda x: x[1])
    if better or worse:
        findings.append(f"Best GIFT beta after RL (mean in-distribution pass@1): {best[0]} "
                        f"({best[1]:.3f}).")
    else:
        findings.append(f"No beta peak to speak of: after RL the GIFT arms' mean pass@1 spans "
                        f"{min(x[1] for x in after):.3f} to {max(x[1] for x in after):.3f} (highest at "
                        f"beta = {best[0]}), within the seed-to-seed noise.")
    if len(sft["seeds"]) < 2:
        head = "One seed per arm: no confidence statement is possible (pipeline check)."
    elif better and not worse:
        head = "GIFT beats SFT after RL here for " + ", ".join(sorted(better)) + "."
    elif worse and not better:
        head = ("GIFT does not beat SFT after RL here; SFT is significantly better than "
                + ", ".join(sorted(worse)) + ".")
    elif better and worse:
        head = (f"Mixed: GIFT is significantly better for {', '.join(sorted(better))} and worse "
                f"for {', '.join(sorted(worse))}.")
    else:
        head = ("GIFT does not beat SFT after RL here: no GIFT arm differs significantly from "
                "SFT in pass@1, in or out of distribution.")
    return head, findings


def fmt(ci):
    if ci is None:
        return "-"
    if ci["n"] < 2:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def tables(arms, comparisons, base):
    out = []
    for stage, title in (("before_rl", "Before RL (after SFT / GIFT)"), ("after_rl", "After RL (GRPO)")):
        out.append(f"### {title}\n")
        labels = [m for m, _ in METRICS if m in arms[0]["summary"][stage]]
        out.append("| arm | beta | " + " | ".join(labels) + " |")
        out.append("|---|---|" + "---|" * len(labels))
        if stage == "before_rl":
            out.append("| base | - | " + " | ".join(
                f"{get(base, p):.3f}" if get(base, p) is not None else "-"
                for m, p in METRICS if m in labels) + " |")
        for arm in arms:
            out.append(f"| {arm['name']} | {arm['beta']} | "
                       + " | ".join(fmt(arm["summary"][stage].get(m)) for m in labels) + " |")
        out.append("")
    out.append("### GIFT - SFT, paired by seed (mean [95% CI], seeds where GIFT is higher)\n")
    labels = [m for m, _ in METRICS[:5] if comparisons and m in comparisons[0]["after_rl"]]
    out.append("| arm | stage | " + " | ".join(labels) + " |")
    out.append("|---|---|" + "---|" * len(labels))
    for c in comparisons:
        for stage in ("before_rl", "after_rl"):
            cells = [f"{fmt(c[stage][m])} ({c[stage][m]['wins']}/{c[stage][m]['n']})" for m in labels]
            out.append(f"| {c['arm']} | {stage.replace('_', ' ')} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("### Final RL reward (mean of the last 5 steps)\n")
    out.append("| arm | reward |\n|---|---|")
    for arm in arms:
        out.append(f"| {arm['name']} | {fmt(arm['summary']['final_rl_reward'])} |")
    return "\n".join(out) + "\n"


def token_table(diagnostics):
    out = ["### Where GIFT differs from SFT: the demonstrated tokens with q(y*) < 0.5 under the base\n",
           f"{diagnostics['tokens']} response tokens of 500 demonstrations; mean base probability "
           f"of the demonstrated token {diagnostics['mean_p_ref']:.3f}. Position: fifths of the "
           "response. Kind: `result` = digits of a stated result, `operand` = other digits.\n",
           "| beta | share q<0.5 | mean q(y*) | by position (1st..5th fifth) | by kind | share of each kind below 0.5 |",
           "|---|---|---|---|---|---|"]
    for beta, d in diagnostics["beta"].items():
        pos = " / ".join(f"{x:.2f}" for x in d["low_by_position"])
        kind = ", ".join(f"{k} {v:.2f}" for k, v in d["low_by_kind"].items() if v > 0) or "-"
        share = ", ".join(f"{k} {v:.3f}" for k, v in d["low_share_of_kind"].items())
        out.append(f"| {beta} | {d['share_q_below_half']:.4f} | {d['mean_q']:.3f} | {pos} | {kind} | {share} |")
    return "\n".join(out) + "\n"


def plots(out, arms, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    files = {}
    # RL reward curves (mean over seeds, 5-step moving average)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arm in enumerate(arms):
        curves = [s["rl_curve"] for s in arm["seeds"]]
        mean = [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]
        smooth = [sum(mean[max(0, t - 4):t + 1]) / len(mean[max(0, t - 4):t + 1]) for t in range(len(mean))]
        ax.plot(range(1, len(mean) + 1), smooth, label=arm["name"], **_line(arm, i, colors))
    ax.set(xlabel="GRPO step", ylabel="mean reward (5-step average, mean of seeds)", title="RL reward")
    ax.legend()
    files["rl_reward"] = _save(fig, out, "rl_reward.png")
    # pass@k before and after RL, ID and OOD
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, split, title in ((axes[0], None, "in distribution (two-step)"),
                             (axes[1], "ood", "out of distribution (three-step)")):
        b = base["ood"] if split else base
        ks = sorted(int(k) for k in b["pass@k"])
        ax.plot(ks, [b["pass@k"][str(k)] for k in ks], color="gray", label="base", lw=1)
        for i, arm in enumerate(arms):
            for stage, style in (("before_rl", "--"), ("after_rl", "-")):
                curves = [(s[stage]["ood"] if split else s[stage])["pass@k"] for s in arm["seeds"]]
                ax.plot(ks, [sum(c[str(k)] for c in curves) / len(curves) for k in ks], style,
                        color=colors[i % len(colors)],
                        label=f"{arm['name']} {'after' if stage == 'after_rl' else 'before'} RL")
        ax.set(xscale="log", xlabel="k", ylabel="pass@k", title=title)
        ticks = [k for k in ks if k & (k - 1) == 0]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
    axes[1].legend(fontsize=7, ncol=2)
    files["pass_at_k"] = _save(fig, out, "pass_at_k.png")
    # beta sweep
    gift = [a for a in arms if a["beta"] != "inf"]
    sft = next(a for a in arms if a["beta"] == "inf")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "pass@1", "in distribution"), (axes[1], "ood pass@1", "out of distribution")):
        for stage, marker, label in (("before_rl", "s", "before RL"), ("after_rl", "o", "after RL")):
            xs = [float(a["beta"]) for a in gift] + [2 * max(float(a["beta"]) for a in gift)]
            cis = [a["summary"][stage][metric] for a in gift + [sft]]
            ax.errorbar(xs, [c["mean"] for c in cis],
                        yerr=[[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]],
                        marker=marker, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs[:-1]] + ["SFT\n(inf)"])
        ax.set(xlabel="beta", ylabel="pass@1 (mean, 95% CI over seeds)", title=f"beta sweep, {title}")
        ax.legend()
    files["beta_sweep"] = _save(fig, out, "beta_sweep.png")
    # entropy over post-training
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arm in enumerate(arms):
        curves = [s["post_training"]["student_entropy"] for s in arm["seeds"]]
        mean = [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=arm["name"], **_line(arm, i, colors))
    ax.set(xlabel="post-training iteration", ylabel="student entropy on demonstrations (nats/token)",
           title="Entropy during SFT / GIFT")
    ax.legend()
    files["post_training_entropy"] = _save(fig, out, "post_training_entropy.png")
    return files


def _line(arm, i, colors):
    """SFT black and dashed, so that a GIFT arm drawn over it (large beta) leaves it visible."""
    return {"color": "black", "linestyle": "--", "zorder": 3} if arm["beta"] == "inf" else \
        {"color": colors[i % len(colors)]}


def _save(fig, out, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _overlap(eval_path, demos_path):
    """Share of the evaluation prompts that are also demonstration prompts."""
    def prompts(path):
        with open(path) as f:
            return [json.loads(line)["prompt"] for line in f if line.strip()]

    demos = set(prompts(demos_path))
    evaluated = prompts(eval_path)
    return sum(p in demos for p in evaluated) / len(evaluated)


def _flags(settings, quick):
    """The command-line settings that differ from the study's defaults."""
    from run import FULL, QUICK

    default = (QUICK if quick else FULL)["post"]["lr"]
    return "" if settings["post"]["lr"] == default else f" --post-lr {settings['post']['lr']:g}"


def write_outputs(out, work, settings, seconds, quick=False):
    with open(os.path.join(work, "base_result.json")) as f:
        base_result = json.load(f)
    arms = load_arms(work, settings)
    overlap = _overlap(os.path.join(work, "data", "eval_two_step.jsonl"),
                       os.path.join(work, "data", "demonstrations.jsonl"))
    comparisons = compare(arms)
    head, findings = verdict(arms, comparisons)
    text = head + " " + " ".join(findings)
    results = {"study": {"quick": quick, "settings": settings, "wall_seconds": seconds,
                         "id_prompts_in_demonstrations": overlap,
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
               "base": base_result["base"], "gift_tokens": base_result["gift_tokens"],
               "arms": arms, "comparisons": comparisons, "verdict": text}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    files = plots(out, arms, base_result["base"])
    seeds = len(settings["seeds"])
    report = [
        "# GIFT vs SFT as the initialisation for RL: a small-scale reproduction\n",
        f"Generated by `python examples/reproduce/run.py{' --quick' if quick else ''}"
        f"{_flags(settings, quick)}` "
        f"({'quick pipeline check, not a result' if quick else 'the full study'}). "
        f"Measured wall time: {seconds / 60:.1f} min on {results['study']['machine']}.\n",
        f"About {overlap:.0%} of the in-distribution prompts also occur among the "
        "demonstrations (6561 two-step problems exist); the three-step set is disjoint from "
        "post-training and RL by construction.\n",
        "## Verdict\n", f"**{head}**\n", "\n".join(f"* {line}" for line in findings) + "\n",
        DESIGN,
        "## Results\n",
        f"{len(arms)} arms x {seeds} seed(s); {settings['eval']['samples']} samples per prompt at "
        f"temperature 1; pass@k is the unbiased estimator. Cells: mean [95% CI over seeds].\n",
        tables(arms, comparisons, base_result["base"]),
        token_table(base_result["gift_tokens"]),
        "## Plots\n",
        *[f"![{k}]({v})\n" for k, v in files.items()],
        "## Settings\n", "```json\n" + json.dumps(settings, indent=1) + "\n```\n",
    ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(report))
