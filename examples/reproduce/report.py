"""The study's outputs: ``preregistration.md`` (before any arm runs), then ``results.json``,
``report.md`` (the preregistration verbatim, then the results) and the plots."""

import json
import math
import os
import platform
import subprocess

from megatron_gift.evaluation.metrics import mean_ci, paired_difference

ARM_ORDER = ["base-rl", "sft", "gift-low", "gift-star", "gift-high", "soft-sft"]
# Distinct colour, marker and line style per arm: arms whose curves coincide stay visible.
ARM_STYLE = {"base-rl": ("#7f7f7f", "s", ":"), "sft": ("#000000", "o", "--"),
             "gift-low": ("#1f77b4", "v", "-."), "gift-star": ("#d62728", "*", "-"),
             "gift-high": ("#2ca02c", "^", (0, (5, 1))), "soft-sft": ("#ff7f0e", "D", (0, (1, 1)))}
ALPHA = 0.05
REFUTE_BOUND = 0.03


def provenance() -> dict:
    """The code's git commit and whether the tree was dirty; the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    def git(*args):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    versions = {}
    for package in ("torch", "megatron-core", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "versions": versions}


# ---------------------------------------------------------------- statistics

def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def contrast(a: list, b: list) -> dict:
    """``a - b`` paired by seed: mean, 95% t-interval, wins, the two-sided p-value of the
    paired t-test; ``degenerate`` (zero variance: no interval, a sign statement instead)."""
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    sd = math.sqrt(sum((x - d["mean"]) ** 2 for x in diffs) / (n - 1)) if n > 1 else 0.0
    d["degenerate"] = n > 1 and sd <= 1e-12 * max(1.0, abs(d["mean"]))
    d["p"] = None if n < 2 or d["degenerate"] else t_two_sided_p(d["mean"] / (sd / math.sqrt(n)), n - 1)
    return d


def holm(ps: list) -> list:
    """Holm-adjusted p-values (None stays None and does not count in the family); statsmodels'
    ``multipletests(method="holm")``, in six lines rather than a dependency."""
    indexed = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, out, running = len(indexed), [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def describe(d: dict, digits: int = 3) -> str:
    """A contrast in words: mean [95% CI] (wins/n), or a sign statement where degenerate."""
    n = d["n"]
    if n < 2:
        return f"{d['mean']:+.{digits}f} (one seed: no interval)"
    if d["degenerate"]:
        if d["mean"] == 0:
            return f"0 in all {n} seeds (zero variance: no interval; no sign)"
        return (f"{d['mean']:+.{digits}f} in all {n} seeds (zero variance: no interval; sign "
                f"{'positive' if d['mean'] > 0 else 'negative'} in {n}/{n})")
    return (f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] "
            f"({d['wins']}/{n} seeds higher)")


# ---------------------------------------------------------------- metrics per unit

def _mean(*xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _stepped(stage: dict, subset: str):
    shares = stage[subset]["styles"]["shares"]
    return shares.get("stepwise", 0.0) + shares.get("backward", 0.0)


def unit_metrics(result: dict) -> dict:
    """The study's scalar metrics of one arm and seed (None where undefined)."""
    b, a, curve = result["before_rl"], result["after_rl"], result["rl_curve"]
    m = {"primary": a["objective_pass@1"], "s1 pass@1": a["s1"]["pass@1"],
         "s0 pass@1": a["s0"]["pass@1"],
         "paper pass@1 (T 0.6, 4 samples)": _mean(a["s0"].get("paper_pass@1"),
                                                  a["s1"].get("paper_pass@1")),
         "ood pass@1": _mean(a["ood_s0"]["pass@1"], a["ood_s1"]["pass@1"]),
         "KL to base before RL": _mean(b["s0"].get("kl_to_base"), b["s1"].get("kl_to_base")),
         "KL to base after RL": _mean(a["s0"].get("kl_to_base"), a["s1"].get("kl_to_base")),
         "RL reward AUC s0": _mean(*[c["reward_s0"] for c in curve]),
         "RL reward AUC s1": _mean(*[c["reward_s1"] for c in curve]),
         "before RL objective pass@1": b["objective_pass@1"]}
    for subset in ("s0", "s1"):
        for k in ("1", "4", "16", "64"):
            if k in b[subset]["pass@k"]:
                m[f"before RL {subset} pass@{k}"] = b[subset]["pass@k"][k]
    for stage_name, stage in (("before RL", b), ("after RL", a)):
        m[f"{stage_name} s0 compact share"] = stage["s0"]["styles"]["shares"].get("compact", 0.0)
        m[f"{stage_name} s1 steps share"] = _stepped(stage, "s1")
        m[f"{stage_name} s1 compact share"] = stage["s1"]["styles"]["shares"].get("compact", 0.0)
        m[f"{stage_name} s0 compact accuracy"] = stage["s0"]["styles"]["accuracy"].get("compact")
        m[f"{stage_name} s1 stepwise accuracy"] = stage["s1"]["styles"]["accuracy"].get("stepwise")
    return m


SECONDARY = ["s1 pass@1", "s0 pass@1", "paper pass@1 (T 0.6, 4 samples)",
             "before RL s0 pass@1", "before RL s0 pass@4", "before RL s0 pass@16",
             "before RL s0 pass@64", "before RL s1 pass@1", "before RL s1 pass@4",
             "before RL s1 pass@16", "before RL s1 pass@64",
             "before RL s0 compact share", "before RL s1 steps share",
             "after RL s0 compact share", "after RL s1 steps share",
             "before RL s0 compact accuracy", "before RL s1 stepwise accuracy",
             "after RL s0 compact accuracy", "after RL s1 stepwise accuracy",
             "KL to base before RL", "KL to base after RL", "RL reward AUC s0",
             "RL reward AUC s1", "ood pass@1"]


def load_arms(work: str, settings: dict, arm_list: list) -> list:
    out = []
    for arm in arm_list:
        seeds = []
        for seed in settings["seeds"]:
            with open(os.path.join(work, "units", f"{arm['name']}-s{seed}", "result.json")) as f:
                seeds.append(json.load(f))
        metrics = [unit_metrics(s) for s in seeds]
        summary = {k: mean_ci([m[k] for m in metrics]) for k in metrics[0]
                   if all(m[k] is not None for m in metrics)}
        out.append({**arm, "seeds": seeds, "metrics": metrics, "summary": summary})
    return out


def arm_contrast(arms: dict, a: str, b: str, key: str):
    x, y = [m.get(key) for m in arms[a]["metrics"]], [m.get(key) for m in arms[b]["metrics"]]
    return None if None in x + y else contrast(x, y)


# ---------------------------------------------------------------- analysis

def analyse(arm_list: list, gates_passed: bool) -> dict:
    """Primary contrast and decision, mechanism steps, premise, specificity, inverted U and the
    Holm-corrected secondary family."""
    arms = {a["name"]: a for a in arm_list}
    primary = arm_contrast(arms, "gift-star", "sft", "primary")
    premise_value = arms["sft"]["summary"]["before RL s1 compact share"]["mean"]
    premise = premise_value >= 0.5
    if primary["n"] < 2:
        decision, why = "inconclusive", "one seed: no interval (pipeline check)"
    elif primary["low"] > 0:
        decision, why = "confirmed", f"the lower bound {primary['low']:+.3f} > 0"
    elif gates_passed and premise and primary["high"] < REFUTE_BOUND:
        decision, why = "refuted", (f"gates passed, premise holds (SFT's S1 compact share "
                                    f"{premise_value:.2f} >= 0.5), upper bound "
                                    f"{primary['high']:+.3f} < +{REFUTE_BOUND}")
    else:
        reasons = []
        if not gates_passed:
            reasons.append("the gates did not all pass")
        if not premise:
            reasons.append(f"the premise fails (SFT's S1 compact share {premise_value:.2f} < 0.5)")
        if primary["high"] >= REFUTE_BOUND:
            reasons.append(f"the upper bound {primary['high']:+.3f} >= +{REFUTE_BOUND}")
        decision, why = "inconclusive", "; ".join(reasons) or "neither rule met"
    base_steps = arms["base-rl"]["summary"]["before RL s1 steps share"]["mean"]
    sft_steps = arms["sft"]["summary"]["before RL s1 steps share"]["mean"]
    star_steps = arms["gift-star"]["summary"]["before RL s1 steps share"]["mean"]
    s1 = arm_contrast(arms, "gift-star", "sft", "s1 pass@1")
    mechanism = {
        "M1": {"holds": sft_steps <= 0.5 and base_steps >= 0.95,
               "value": {"sft_s1_steps_share": sft_steps, "base_s1_steps_share": base_steps}},
        "M2": {"holds": star_steps >= 0.5, "value": {"gift_star_s1_steps_share": star_steps}},
        "M3": {"holds": s1["n"] > 1 and s1["low"] > 0, "value": s1}}
    first_failure = next((k for k, v in mechanism.items() if not v["holds"]), None)
    family = [(k, arm_contrast(arms, "gift-star", "sft", k)) for k in SECONDARY]
    family = [(k, d) for k, d in family if d is not None]
    adjusted = holm([d["p"] for _, d in family])
    secondary = [{"metric": k, **d, "p_holm": p, "significant": p is not None and p < ALPHA}
                 for (k, d), p in zip(family, adjusted)]
    u = [arm_contrast(arms, "gift-star", n, "primary") for n in ("gift-low", "gift-high")]
    u_adjusted = holm([d["p"] for d in u])
    inverted_u = {"vs gift-low": {**u[0], "p_holm": u_adjusted[0]},
                  "vs gift-high": {**u[1], "p_holm": u_adjusted[1]},
                  "holds": all(d["mean"] > 0 and p is not None and p < ALPHA
                               for d, p in zip(u, u_adjusted))}
    return {"primary": primary, "decision": decision, "decision_reason": why,
            "premise": {"holds": premise, "sft_s1_compact_share_before_rl": premise_value},
            "mechanism": mechanism, "mechanism_first_failure": first_failure,
            "specificity": arm_contrast(arms, "gift-star", "soft-sft", "primary"),
            "vs_base_rl": arm_contrast(arms, "gift-star", "base-rl", "primary"),
            "sft_vs_base_rl": arm_contrast(arms, "sft", "base-rl", "primary"),
            "inverted_u": inverted_u, "secondary": secondary}


# ---------------------------------------------------------------- preregistration

def _gate_table(gate_record: dict) -> str:
    rows = ["| run | change | G1 median p(fork) | G2 S1 states / pass@1 | G3 pilot - base S0 "
            "pass@1 | G4 projected min | all passed |", "|---|---|---|---|---|---|---|"]
    for i, run in enumerate(gate_record["runs"], 1):
        g = run["gates"]

        def mark(name, text):
            return f"{text} ({'pass' if g[name]['passed'] else 'FAIL'})"

        rows.append(
            f"| {i} | {run['change']} | {mark('G1', format(g['G1']['value'], '.2e'))} | "
            f"{mark('G2', '{:.3f} / {:.3f}'.format(*g['G2']['value'].values()))} | "
            f"{mark('G3', _g3_text(g['G3']['value']))} | "
            f"{mark('G4', format(g['G4']['value']['projected_minutes'], '.1f'))} | "
            f"{all(v['passed'] for v in g.values())} |")
    return "\n".join(rows)


def _g3_text(value: dict) -> str:
    return (f"{value['gain']:+.3f} ({value['pilot_s0_pass@1']:.3f} vs "
            f"{value['base_s0_pass@1']:.3f})")


def _arm_setting(arm: dict) -> str:
    if arm.get("soft_sft_weight") is not None:
        return f"w = {arm['soft_sft_weight']:.4f} (beta unused)"
    return "-" if arm["beta"] is None else str(arm["beta"])


def write_preregistration(out: str, gates: dict) -> str:
    """``preregistration.md``: written after the gates, before any arm runs; returns its text."""
    cal, prov, s = gates["calibration"], gates["provenance"], gates["settings"]
    record = gates["gate_record"]
    arm_lines = "\n".join(f"| {a['name']} | {a['kind']} | {_arm_setting(a)} |"
                          for a in gates["arms"])
    gate_status = ("all passed" if record["passed"] else
                   "NOT all passed" + ("" if record["enforced"] else " (not enforced: --quick)"))
    text = f"""# Preregistration: does GIFT hand RL a better start than SFT? ("audit chains")

Written by `examples/reproduce/run.py{' --quick' if gates['quick'] else ''}` after the gates and
before any arm ran. Code: commit `{prov['commit']}`, working tree
{'dirty (uncommitted changes)' if prov['dirty'] else 'clean'}; torch {prov['versions']['torch']},
megatron-core {prov['versions']['megatron-core']}, transformers {prov['versions']['transformers']}.
{'**Quick pipeline check: not a result.**' if gates['quick'] else ''}

## Gates ({gate_status})

Every gate run, in order (a failed gate changes only its knob: G1 the compact share in
pretraining, G2 the audit share, G3 the post-training steps, G4 RL steps 100 -> 80 then
evaluation prompts 200 -> 150):

{_gate_table(record)}

## Calibration (from the base, before any arm)

beta* = median over the {s['data']['demonstrations']} demonstrations of ln((1 - p) / p), p the
base's probability of the demonstrated fork token (`(`, the compact style's first token):
median p = {cal['fork_p_median']:.3e}, **beta* = {cal['beta_star']:.3f}**; neighbours
{cal['beta_low']:.3f} and {cal['beta_high']:.3f}. Soft-SFT weight **w = {cal['soft_sft_weight']:.4f}**
= mean over demonstrated tokens of 1 - q_beta*(y*) (the same total softness, spread evenly).

## Arms

One base; identical demonstrations, order, steps ({s['post']['train_iters']}) and learning rate
({s['post']['lr']:g}) for post-training; identical GRPO ({s['rl']['steps']} steps, {s['rl']['prompts']}
prompts x {s['rl']['group']} samples, lr {s['rl']['lr']:g}, temperature 1, KL 0).

| arm | kind | beta / weight |
|---|---|---|
{arm_lines}

Seeds {s['seeds']}: each fixes post-training order, the RL prompt stream and the sampling
generators, shared across arms (common random numbers). Inference is conditional on the one base.

## Primary endpoint and decision rule

* Primary endpoint: after RL, pass@1 on the RL objective (mean of S0 and S1, S1 with the
  process check), temperature 1, {s['eval']['samples']} samples, {s['data']['eval_prompts']} prompts per subset.
* Primary contrast: GIFT beta* - SFT, paired over seeds, 95% t-interval.
* **Confirmed** here: the lower bound > 0. **Refuted** here: gates passed, premise holds (SFT's
  compact share on S1 before RL >= 0.5) and the upper bound < +{REFUTE_BOUND}. Otherwise
  **inconclusive** (with the bounds).
* Secondary, Holm-corrected as one family (GIFT beta* - SFT, paired t-tests, alpha {ALPHA}):
  S1 pass@1, S0 pass@1, pass@1 at temperature {s['eval']['paper_temperature']} with
  {s['eval']['paper_samples']} samples, pre-RL pass@k (k = 1, 4, 16, 64) on S0 and S1, per-style
  share and accuracy before and after RL, KL to the base before and after RL, RL reward AUC per
  subset, OOD pass@1. Contrasts with zero variance get a sign statement and no test.
* Mechanism: (M1) SFT's S1 steps share before RL <= 0.5 while the base's >= 0.95; (M2) GIFT
  beta*'s >= 0.5; (M3) the S1 contrast after RL has its lower bound > 0. The first failing step
  is reported.
* Specificity: GIFT beta* - soft SFT on the primary. Inverted U: beta* beats both neighbours on
  the primary (Holm over the two). Also reported: GIFT beta* and SFT against base -> RL.
"""
    with open(os.path.join(out, "preregistration.md"), "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------- outputs

def _fmt(ci) -> str:
    if ci is None:
        return "-"
    if ci["n"] < 2:
        return f"{ci['mean']:.3f}"
    if ci["low"] == ci["high"]:
        return f"{ci['mean']:.3f} (all seeds equal)"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


ARM_TABLE = ["primary", "s0 pass@1", "s1 pass@1", "paper pass@1 (T 0.6, 4 samples)",
             "ood pass@1", "before RL objective pass@1", "before RL s0 compact share",
             "before RL s1 steps share", "before RL s1 compact share", "after RL s1 steps share",
             "KL to base before RL", "KL to base after RL"]


def arm_table(arm_list: list) -> str:
    rows = ["| metric | " + " | ".join(a["name"] for a in arm_list) + " |",
            "|---|" + "---|" * len(arm_list)]
    for key in ARM_TABLE:
        rows.append(f"| {key} | " + " | ".join(_fmt(a["summary"].get(key)) for a in arm_list) + " |")
    return "\n".join(rows)


def results_text(analysis: dict, gates: dict, base_result: dict) -> str:
    a, p = analysis, analysis["primary"]
    lines = ["## Decision\n",
             f"**{a['decision'].upper()}**: GIFT beta* - SFT on the primary endpoint = "
             f"{describe(p)}; {a['decision_reason']}.\n",
             f"* Premise (SFT's collapse to compact spreads to the never-demonstrated audit "
             f"prompts): SFT's S1 compact share before RL = "
             f"{a['premise']['sft_s1_compact_share_before_rl']:.3f} -> "
             f"{'holds' if a['premise']['holds'] else 'FAILS: the paper premise does not hold in this world'}.",
             "* Mechanism: " + "; ".join(
                 f"{k} {'holds' if v['holds'] else 'fails'}" for k, v in a["mechanism"].items())
             + (f" (first failing step: {a['mechanism_first_failure']})"
                if a["mechanism_first_failure"] else " (all steps hold)") + ".",
             f"  M1: SFT S1 steps share {a['mechanism']['M1']['value']['sft_s1_steps_share']:.3f}, "
             f"base {a['mechanism']['M1']['value']['base_s1_steps_share']:.3f}; M2: GIFT beta* "
             f"{a['mechanism']['M2']['value']['gift_star_s1_steps_share']:.3f}; M3: S1 pass@1 "
             f"contrast {describe(a['mechanism']['M3']['value'])}.",
             f"* Specificity, GIFT beta* - soft SFT: {describe(a['specificity'])}.",
             f"* Inverted U: beta* - (beta* - 3) {describe(a['inverted_u']['vs gift-low'])}; "
             f"beta* - (beta* + 3) {describe(a['inverted_u']['vs gift-high'])}; "
             f"{'holds' if a['inverted_u']['holds'] else 'not shown'} (Holm over the two).",
             f"* Against base -> RL: GIFT beta* {describe(a['vs_base_rl'])}; SFT "
             f"{describe(a['sft_vs_base_rl'])}.\n",
             "## Secondary endpoints (GIFT beta* - SFT, Holm-corrected as one family)\n",
             "| metric | contrast (mean [95% CI], seeds higher) | p | p (Holm) |",
             "|---|---|---|---|"]
    for s in a["secondary"]:
        pv = "-" if s["p"] is None else f"{s['p']:.3f}"
        ph = "-" if s["p_holm"] is None else f"{s['p_holm']:.3f}" + (" *" if s["significant"] else "")
        lines.append(f"| {s['metric']} | {describe(s)} | {pv} | {ph} |")
    lines.append("\n`*`: significant at 0.05 after Holm. `-`: no test (one seed, or zero variance: "
                 "the sign statement in the contrast column).\n")
    return "\n".join(lines)


def token_text(diagnostics: dict) -> str:
    rows = ["### Where GIFT's target departs from SFT's: demonstrated tokens with q(y*) < 0.5\n",
            f"{diagnostics['tokens']} response tokens of the demonstrations; mean base "
            f"probability of the demonstrated token {diagnostics['mean_p_ref']:.3f}.\n",
            "| beta | share q<0.5 | mean q(y*) | share of each kind below 0.5 |", "|---|---|---|---|"]
    for beta, d in diagnostics["beta"].items():
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in d["low_share_of_kind"].items())
        rows.append(f"| {beta} | {d['share_q_below_half']:.4f} | {d['mean_q']:.3f} | {kinds} |")
    return "\n".join(rows) + "\n"


LIMITS = """## What this scale cannot test

Whether real reasoning traces put reward-relevant forks in a 7-8B base's 1e-8 tail; anything
tied to a 150k vocabulary and bf16 tails (the lambda/V floor, beta = 20 itself: beta here is
calibrated to this world); long chains of thought; general-capability retention; model-family
effects; the paper's absolute numbers. A positive result shows GIFT *can* carry prior knowledge
through SFT into RL when the conditions hold; a negative one with the gates passed refutes the
mechanism in its most favourable setting. Neither sizes the effect on real models.
"""


def plots(out: str, arm_list: list, base: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}

    def style(name):
        color, marker, line = ARM_STYLE[name]
        return {"color": color, "marker": marker, "linestyle": line, "markersize": 5}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "reward_s0", "regular prompts (S0)"),
                           (axes[1], "reward_s1", "audit prompts (S1)")):
        for arm in arm_list:
            curves = [[c[key] for c in s["rl_curve"]] for s in arm["seeds"]]
            mean = [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]
            smooth = [sum(mean[max(0, t - 4):t + 1]) / len(mean[max(0, t - 4):t + 1])
                      for t in range(len(mean))]
            ax.plot(range(1, len(mean) + 1), smooth, label=arm["name"],
                    markevery=max(1, len(mean) // 8), **style(arm["name"]))
        ax.set(xlabel="GRPO step", ylabel="reward (5-step average, mean of seeds)", title=title)
    axes[1].legend(fontsize=8)
    files["rl_reward"] = _save(fig, out, "rl_reward.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, subset in ((axes[0], "s0"), (axes[1], "s1")):
        for arm in arm_list:
            curves = [s["before_rl"][subset]["pass@k"] for s in arm["seeds"]]
            ks = sorted(int(k) for k in curves[0])
            ax.plot(ks, [sum(c[str(k)] for c in curves) / len(curves) for k in ks],
                    label=arm["name"], markevery=max(1, len(ks) // 8), **style(arm["name"]))
        ax.set(xscale="log", xlabel="k", ylabel="pass@k before RL (mean of seeds)",
               title=f"before RL, {subset.upper()}")
    axes[1].legend(fontsize=8)
    files["pass_at_k"] = _save(fig, out, "pass_at_k.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(arm_list):
        for j, (key, label) in enumerate((("before RL objective pass@1", "before RL"),
                                          ("primary", "after RL"))):
            ci = arm["summary"][key]
            color, marker, _ = ARM_STYLE[arm["name"]]
            ax.errorbar([i + (j - 0.5) * 0.3], [ci["mean"]],
                        yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]], color=color,
                        marker=marker, mfc=color if j else "white", capsize=3, linestyle="none",
                        label=label if i == 0 else None)
    ax.set_xticks(range(len(arm_list)), [a["name"] for a in arm_list], rotation=20)
    ax.set(ylabel="RL-objective pass@1 (mean, 95% CI)",
           title="primary endpoint (open: before RL, filled: after RL)")
    files["primary"] = _save(fig, out, "primary.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "s0 compact share", "S0: compact share"),
                           (axes[1], "s1 steps share", "S1: share stating the steps")):
        for i, arm in enumerate(arm_list):
            color, marker, _ = ARM_STYLE[arm["name"]]
            for j, stage in enumerate(("before RL", "after RL")):
                ax.bar(i + (j - 0.5) * 0.38, arm["summary"][f"{stage} {key}"]["mean"], 0.36,
                       color=color, hatch="//" if j == 0 else None,
                       alpha=0.5 if j == 0 else 1.0, edgecolor="black")
        ax.set_xticks(range(len(arm_list)), [a["name"] for a in arm_list], rotation=20)
        ax.set(ylim=(0, 1), ylabel="share of samples (hatched: before RL)", title=title)
    files["styles"] = _save(fig, out, "styles.png")
    return files


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def write_outputs(out: str, work: str, settings: dict, seconds: float, quick: bool,
                  recorded) -> dict:
    """``results.json``, ``report.md`` and the plots from the work folder; ``recorded``: the
    study section of an earlier results.json (``--report-only``), else None."""
    with open(os.path.join(work, "gates.json")) as f:
        gates = json.load(f)
    with open(os.path.join(work, "base_result.json")) as f:
        base_result = json.load(f)
    arm_list = load_arms(work, settings, gates["arms"])
    record = gates["gate_record"]
    analysis = analyse(arm_list, record["passed"] and record["enforced"])
    prov = gates["provenance"]
    now = provenance() if recorded is None else recorded.get("code_at_report", {})
    study = {"quick": quick, "settings": settings, "wall_seconds": seconds,
             "code": {"commit": prov["commit"], "dirty": prov["dirty"]},
             "code_at_report": {k: now.get(k) for k in ("commit", "dirty")},
             "versions": prov["versions"],
             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for arm in arm_list:
        for s in arm["seeds"]:
            for stage in ("before_rl", "after_rl"):
                for subset in ("s0", "s1", "ood_s0", "ood_s1"):
                    s[stage][subset].pop("examples", None)
    results = {"study": study,
               "gates": [{k: run[k] for k in ("change", "gates", "calibration", "settings")}
                         for run in record["runs"]],
               "gates_passed": record["passed"], "gates_enforced": record["enforced"],
               "calibration": gates["calibration"], "preregistration": gates["preregistration"],
               "base": base_result["base"], "gift_tokens": base_result["gift_tokens"],
               "arms": [{k: a[k] for k in a if k != "seeds"} | {"seeds": a["seeds"]}
                        for a in arm_list],
               **{k: analysis[k] for k in analysis}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    files = plots(out, arm_list, base_result["base"])
    report = [gates["preregistration"], "\n---\n", "# Results\n",
              f"Generated by `python examples/reproduce/run.py{' --quick' if quick else ''}` "
              f"({'quick pipeline check, not a result' if quick else 'the full study'}); "
              f"measured wall time {seconds / 60:.1f} min on {study['machine']}. Commit "
              f"`{prov['commit']}` ({'dirty tree' if prov['dirty'] else 'clean tree'}).\n",
              results_text(analysis, gates, base_result),
              "## Arms (mean [95% CI over seeds])\n", arm_table(arm_list) + "\n",
              token_text(base_result["gift_tokens"]), "## Plots\n",
              *[f"![{k}]({v})\n" for k, v in files.items()], LIMITS,
              "## Settings (after the gates' knobs)\n",
              "```json\n" + json.dumps(settings, indent=1) + "\n```\n"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(report))
    return results
