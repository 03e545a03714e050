"""Does GIFT hand RL a better start than SFT? A test of the paper's mechanism on a CPU.

::

    python examples/reproduce/run.py --out results/reproduction          # the study (make reproduce)
    python examples/reproduce/run.py --out results/reproduction --gates-only
    python examples/reproduce/run.py --out results/reproduction --resume-after-gates
    python examples/reproduce/run.py --quick --out /tmp/repro-quick      # pipeline check, 1 seed
    python examples/reproduce/run.py --out results/reproduction --report-only

The world is "audit chains" (:mod:`megatron_gift.demo.audit`): arithmetic chains where audit
prompts also need the first equation stated, which the base knows to do and the (compact-style)
demonstrations never show.

1. Data and base: a tiny Llama pretrained through this project's engine.
2. Gates on the base and one pilot SFT run with an unused seed (G1 tail, G2 prior knows audits,
   G3 SFT adds value, G4 time); a failed gate changes only its knob and runs again, every run
   recorded. beta* and the soft-SFT weight w are calibrated from the base.
3. ``preregistration.md``: arms, endpoints and the decision rule, written before any arm runs.
4. Arms x seeds (common random numbers): base -> RL, SFT, GIFT beta* - 3, beta*, beta* + 3 and
   soft SFT; each post-trained through the engine (one process per unit), evaluated, trained
   with GRPO (``grpo.py``) and evaluated again.
5. ``results.json``, ``report.md`` (the preregistration verbatim, then the results) and plots.

Checkpoints go to ``--out/work`` (not for committing). ``--report-only`` re-renders the outputs
from ``--out/work`` with the settings recorded in ``--out/results.json``.
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]

# The study's settings (study design: /docs/reproduction.md); gates may change their knobs.
# The knobs start where the calibration runs left them (results/reproduction/calibration.md:
# from the design's compact share 0.002, audit share 0.3 and 60 post-training steps, five gate
# runs), so that a study pays for one gate run, not the ladder.
CALIBRATED = "settings of the calibration runs (calibration.md)"
FULL = {
    "seeds": [0, 1, 2, 3, 4], "pilot_seed": 99, "workers": 2,
    "data": {"corpus": 12000, "long_share": 0.25, "audit_share": 0.4, "compact_share": 0.008,
             "demonstrations": 2000, "eval_prompts": 200, "held_out_prompts": 200,
             "ood_prompts": 100},
    "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 176, "seq_length": 64},
    "base": {"train_iters": 1200, "micro_batch_size": 16, "global_batch_size": 32,
             "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 20, "seed": 1234},
    "post": {"train_iters": 300, "micro_batch_size": 8, "global_batch_size": 16, "lr": 1e-4},
    "rl": {"steps": 100, "prompts": 16, "group": 8, "lr": 1e-4, "max_new_tokens": 24},
    "eval": {"samples": 16, "pre_rl_samples": 64, "paper_samples": 4, "paper_temperature": 0.6,
             "ood_samples": 16, "max_new_tokens": {"id": 24, "ood": 40}},
    "gates": {"fork_p": [5e-4, 1e-2], "s1_states": 0.95, "s1_pass": 0.3, "sft_gain": 0.05,
              "minutes": 60, "reruns": 4, "enforced": True, "timed_rl_steps": 4,
              "contention": 1.15},
    "beta_offset": 3.0,
}
QUICK = {**FULL, "seeds": [0], "workers": 2,
         "data": {**FULL["data"], "corpus": 600, "demonstrations": 48, "eval_prompts": 4, "held_out_prompts": 4,
                  "ood_prompts": 2, "compact_share": 0.05},
         "model": {**FULL["model"], "num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64,
                   "seq_length": 48},
         "base": {**FULL["base"], "train_iters": 6, "micro_batch_size": 8, "global_batch_size": 8},
         "post": {**FULL["post"], "train_iters": 2, "global_batch_size": 8},
         "rl": {**FULL["rl"], "steps": 2, "prompts": 2, "group": 2},
         "eval": {**FULL["eval"], "samples": 4, "pre_rl_samples": 8, "paper_samples": 2,
                  "ood_samples": 2},
         "gates": {**FULL["gates"], "enforced": False, "timed_rl_steps": 1}}
# Each gate's knob: the settings path it changes and the values it tries, in order.
KNOBS = {"G1": ("data", "compact_share"), "G2": ("data", "audit_share"),
         "G3": ("post", "train_iters"), "G4": None}
G3_STEPS = [450]
G4_LADDER = [("rl", "steps", 80), ("data", "eval_prompts", 150)]


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def paths(work: str) -> dict[str, str]:
    data = os.path.join(work, "data")
    return {"data": data, "corpus": os.path.join(data, "corpus.jsonl"),
            "demos": os.path.join(data, "demonstrations.jsonl"),
            "tokenizer": os.path.join(data, "tokenizer"),
            **{k: os.path.join(data, f"eval_{k}.jsonl") for k in ("s0", "s1", "ood_s0", "ood_s1")},
            "base": os.path.join(work, "base"), "base_hf": os.path.join(work, "base_hf"), "units": os.path.join(work, "units"),
            "gates": os.path.join(work, "gates.json")}


# ---------------------------------------------------------------- data and base

def prepare_data(work: str, settings: dict) -> None:
    """The world's files: evaluation sets first (held out of everything else), then the
    pretraining corpus, the demonstrations and the tokenizer (bundled + the audit marker)."""
    from megatron_gift.demo import audit
    from megatron_gift.demo.synthetic import build_tokenizer

    p, d = paths(work), settings["data"]
    os.makedirs(p["data"], exist_ok=True)
    # The held-out sets have a fixed size; the evaluation uses their first eval_prompts (G4's
    # knob), so changing it changes neither the corpus nor the base.
    sets = {"s0": audit.eval_set(d["held_out_prompts"], 1236, 2, False)}
    sets["s1"] = audit.eval_set(d["held_out_prompts"], 1237, 2, True, audit.held_out(sets["s0"]))
    sets["ood_s0"] = audit.eval_set(d["ood_prompts"], 1238, 3, False)
    sets["ood_s1"] = audit.eval_set(d["ood_prompts"], 1239, 3, True, audit.held_out(sets["ood_s0"]))
    keep = ("prompt", "answer", "first_equation", "expression", "audit", "steps")
    exclude = set().union(*(audit.held_out(r) for r in sets.values()))
    for name, records in sets.items():
        audit.write_jsonl(p[name], records[:d["eval_prompts"]] if name in ("s0", "s1") else records,
                          keep)
    c = d["compact_share"]
    corpus = audit.corpus(d["corpus"], 1234, exclude, d["long_share"], d["audit_share"],
                          {"stepwise": 0.7, "backward": 0.3 - c, "compact": c},
                          {"stepwise": 0.7, "backward": 0.3})
    audit.write_jsonl(p["corpus"], corpus)
    audit.write_jsonl(p["demos"], audit.demonstrations(d["demonstrations"], 1235, exclude))
    build_tokenizer([audit.AUDIT_MARKER]).save_pretrained(p["tokenizer"])


def held_out_expressions(work: str) -> set[str]:
    from megatron_gift.demo import audit

    p = paths(work)
    return {r["expression"] for k in ("s0", "s1", "ood_s0", "ood_s1")
            for r in audit.read_jsonl(p[k])}


def engine_config(work: str, settings: dict, overrides: dict) -> dict:
    """The trainer's config: the study's model, tokenizer and ``overrides`` (sections)."""
    model = {**settings["model"], "tokenizer": paths(work)["tokenizer"]}
    return {"model": model, **overrides}


# The trainer's log files, open for the process's life: a library's logging handler made while
# one is stdout/stderr (transformers' is) keeps writing to it afterwards.
_LOGS = []


def train_in_process(config: dict, argv: list[str], log_path: str) -> None:
    """This project's trainer, in this process (one rank), its output to ``log_path``."""
    import contextlib

    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    import torch.distributed as dist

    from megatron_gift.platform.distributed import free_port

    out = open(log_path, "w")
    _LOGS.append(out)
    # A world of one rank on a fresh port per run, so that one process can train several times.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            train(parse_config(argv, defaults=config))
    finally:
        dist.destroy_process_group()
        out.flush()


def build_base(work: str, settings: dict) -> None:
    p, b = paths(work), settings["base"]
    config = engine_config(work, settings, {
        "data": {"train_path": p["corpus"]},
        "training": {k: b[k] for k in ("train_iters", "micro_batch_size", "global_batch_size",
                                       "seed")} | {"eval_interval": 100000},
        "optimizer": {"lr": b["lr"], "min_lr": b["min_lr"], "lr_warmup_iters": b["lr_warmup_iters"]},
        "checkpoint": {"save": p["base"]},
        "logging": {"metrics_file": os.path.join(work, "base_metrics.jsonl"), "progress": False}})
    train_in_process(config, ["gift.beta=inf"], os.path.join(work, "base.log"))


def post_train(work: str, settings: dict, unit: str, arm: dict, seed: int) -> None:
    """SFT, GIFT or soft SFT from the base on the demonstrations (``arm``: its ``beta`` or
    ``soft_sft_weight``), data order by ``seed``; the checkpoint in ``unit/ckpt``."""
    p, s = paths(work), settings["post"]
    config = engine_config(work, settings, {
        "data": {"train_path": p["demos"]},
        "training": {"train_iters": s["train_iters"], "micro_batch_size": s["micro_batch_size"],
                     "global_batch_size": s["global_batch_size"], "seed": 100 + seed,
                     "eval_interval": 100000},
        "optimizer": {"lr": s["lr"], "min_lr": s["lr"], "lr_decay_style": "constant"},
        "checkpoint": {"pretrained_checkpoint": p["base"], "save": os.path.join(unit, "ckpt")},
        "logging": {"metrics_file": os.path.join(unit, "post_metrics.jsonl"), "progress": False}})
    argv = [f"gift.beta={arm['beta']}"]
    if arm.get("soft_sft_weight") is not None:
        argv = ["gift.beta=20", f"gift.soft_sft_weight={arm['soft_sft_weight']}"]
    train_in_process(config, argv, os.path.join(unit, "post.log"))


# ---------------------------------------------------------------- evaluation

def evaluate_stage(model, tokenizer, work: str, settings: dict, base_model, seed: int,
                   before_rl: bool) -> dict:
    """Per subset (s0, s1, ood_s0, ood_s1): pass@k, styles and their accuracy, entropy, KL to
    the base (s0, s1); after RL also pass@1 at the paper's temperature (``paper``)."""
    from megatron_gift.demo import audit
    from megatron_gift.evaluation.policy import evaluate_policy

    p, e = paths(work), settings["eval"]
    result = {}
    for name in ("s0", "s1", "ood_s0", "ood_s1"):
        records = audit.read_jsonl(p[name])
        ood = name.startswith("ood")
        samples = e["ood_samples"] if ood else e["pre_rl_samples"] if before_rl else e["samples"]
        states = []
        r = evaluate_policy(model, tokenizer, records, samples,
                            e["max_new_tokens"]["ood" if ood else "id"], _recording_check(states),
                            50_000 + seed, None if ood else base_model, style_of=audit.style_of)
        result[name] = {k: r[k] for k in ("pass@1", "pass@k", "entropy", "length", "styles",
                                          "examples") if k in r}
        if "kl_to_reference" in r:
            result[name]["kl_to_base"] = r["kl_to_reference"]
        result[name]["states_first_equation"] = sum(states) / len(states)
        if not before_rl and not ood:
            paper = evaluate_policy(model, tokenizer, records, e["paper_samples"],
                                    e["max_new_tokens"]["id"], audit.is_correct, 60_000 + seed,
                                    temperature=e["paper_temperature"])
            result[name]["paper_pass@1"] = paper["pass@1"]
    result["objective_pass@1"] = (result["s0"]["pass@1"] + result["s1"]["pass@1"]) / 2
    return result


def _recording_check(states: list):
    """The RL objective's check, recording per sample whether the first equation is stated."""
    from megatron_gift.demo import audit

    def check(text: str, record: dict) -> bool:
        states.append(audit.states_first_equation(text, record["first_equation"]))
        return audit.is_correct(text, record)

    return check


def fork_probabilities(model, tokenizer, records: list) -> list[float]:
    """The base's probability of the compact style's first token after each demonstration's
    prompt (the fork where the demonstrated style departs from the base's habit)."""
    import torch

    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.demo.audit import fork_token
    from megatron_gift.evaluation.sampling import real_vocab_size, sequence_logprobs

    pad = tokenizer.pad_token_id
    token = fork_token(tokenizer)
    with torch.no_grad():
        logps = sequence_logprobs(model, [prompt_ids(tokenizer, r["prompt"]) for r in records],
                                  [[token]] * len(records), pad, real_vocab_size(model, tokenizer))
    return [math.exp(float(lp[0])) for lp in logps]


def calibrate(fork_p: list[float], offset: float) -> dict:
    """beta* = median over demonstrations of ln((1 - p) / p) (q at the fork ~0.5); its
    neighbours beta* -/+ offset (clamped at 0)."""
    logits = sorted(math.log((1 - p) / p) for p in fork_p)
    n = len(logits)
    star = (logits[n // 2] + logits[(n - 1) // 2]) / 2
    ps = sorted(fork_p)
    return {"beta_star": star, "beta_low": max(0.0, star - offset), "beta_high": star + offset,
            "fork_p_median": (ps[n // 2] + ps[(n - 1) // 2]) / 2}


def run_base_unit(work: str, settings: dict) -> dict:
    """Build the base, evaluate it, measure the gate statistics and calibrate beta* and w."""
    import torch

    from megatron_gift.demo import audit
    from megatron_gift.evaluation.policy import gift_token_diagnostics
    from megatron_gift.evaluation.sampling import load_policy

    torch.set_num_threads(1)
    started = time.time()
    if not os.path.isdir(paths(work)["base"]):
        build_base(work, settings)
    built = time.time()
    if os.path.isdir(paths(work)["base_hf"]):
        shutil.rmtree(paths(work)["base_hf"])
    model, tokenizer = load_policy(paths(work)["base"], paths(work)["base_hf"])
    stage = evaluate_stage(model, tokenizer, work, settings, model, 0, before_rl=True)
    demos = audit.read_jsonl(paths(work)["demos"])
    fork_p = fork_probabilities(model, tokenizer, demos)
    cal = calibrate(fork_p, settings["beta_offset"])
    betas = [cal["beta_low"], cal["beta_star"], cal["beta_high"], 20.0]
    diagnostics = gift_token_diagnostics(model, tokenizer, demos, betas)
    cal["soft_sft_weight"] = 1 - diagnostics["beta"][f"{cal['beta_star']:g}"]["mean_q"]
    result = {"base": stage, "gift_tokens": diagnostics, "calibration": cal,
              "fork_p": fork_p, "seconds": {"base": built - started, "eval": time.time() - built}}
    with open(os.path.join(work, "base_result.json"), "w") as f:
        json.dump(result, f)
    return result


# ---------------------------------------------------------------- units

def arms(calibration: dict) -> list[dict]:
    """The six arms: name, kind, beta (``"inf"``: SFT), soft-SFT weight, post-trained or not."""
    b, w = calibration, calibration["soft_sft_weight"]
    return [{"name": "base-rl", "kind": "base -> RL", "beta": None, "post": False},
            {"name": "sft", "kind": "SFT", "beta": "inf", "post": True},
            {"name": "gift-low", "kind": "GIFT beta* - 3", "beta": round(b["beta_low"], 4), "post": True},
            {"name": "gift-star", "kind": "GIFT beta*", "beta": round(b["beta_star"], 4), "post": True},
            {"name": "gift-high", "kind": "GIFT beta* + 3", "beta": round(b["beta_high"], 4), "post": True},
            {"name": "soft-sft", "kind": "soft SFT", "beta": None, "soft_sft_weight": round(w, 6),
             "post": True}]


def run_unit(work: str, settings: dict, arm: dict, seed: int, rl_steps=None,
             unit_name=None) -> dict:
    """One arm and seed: post-training (engine, in this process), export, evaluation, GRPO,
    evaluation; ``result.json`` in the unit's folder."""
    import torch

    from grpo import GRPOSettings, grpo
    from megatron_gift.evaluation.sampling import load_policy

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    unit = os.path.join(paths(work)["units"], unit_name or f"{arm['name']}-s{seed}")
    if os.path.isdir(unit):  # a rerun (the pilot after a gate's knob turned) starts afresh
        shutil.rmtree(unit)
    os.makedirs(unit)
    seconds, started = {}, time.time()
    base_hf = paths(work)["base_hf"]  # exported once, before any unit
    base_model, tokenizer = load_policy(base_hf)
    if arm["post"]:
        post_train(work, settings, unit, arm, seed)
        model, _ = load_policy(os.path.join(unit, "ckpt"), os.path.join(unit, "hf"))
        seconds["post_training"] = time.time() - started
        t = time.time()
        before = evaluate_stage(model, tokenizer, work, settings, base_model, seed, before_rl=True)
        seconds["eval_before"] = time.time() - t
    else:
        model, _ = load_policy(base_hf)
        with open(os.path.join(work, "base_result.json")) as f:
            before = json.load(f)["base"]  # the base's own evaluation: it is this arm's start
    t = time.time()
    rl = GRPOSettings(**{**settings["rl"], "steps": rl_steps or settings["rl"]["steps"]})
    curve = grpo(model, tokenizer, rl, seed, held_out_expressions(work))
    seconds["rl"], seconds["rl_steps"] = time.time() - t, rl.steps
    t = time.time()
    after = evaluate_stage(model, tokenizer, work, settings, base_model, seed, before_rl=False)
    seconds["eval_after"] = time.time() - t
    seconds["total"] = time.time() - started
    result = {"arm": arm["name"], "seed": seed, "before_rl": before, "after_rl": after,
              "rl_curve": curve, "post_training": _post_metrics(unit), "seconds": seconds}
    with open(os.path.join(unit, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def _post_metrics(unit: str) -> dict:
    path = os.path.join(unit, "post_metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {k: [r.get(k) for r in rows] for k in
            ("loss", "student_entropy", "target_mass", "student_label_prob")}


def _subprocess(out: str, args: list[str], log_path: str, quick: bool) -> None:
    """This script in a process of its own (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, os.path.abspath(__file__), "--out", out, *args] + (
        ["--quick"] if quick else [])
    with open(log_path, "w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {code}); see {log_path}")


# ---------------------------------------------------------------- gates

def gate_run(study: "Study", redo: str, previous: dict = None) -> dict:
    """One gate run: ``redo`` is what a changed knob invalidates (``base``: data, base and
    everything after; ``pilot``: the pilot SFT; ``eval``: the base's evaluation; ``projection``:
    only G4). G1, G2 on the base; G3 on the pilot SFT; G4 the projected time."""
    base, pilot = study.gate_units(redo) if redo != "projection" else (None, None)
    base, pilot = base or previous["base"], pilot or previous["pilot"]
    cal, g = base["calibration"], study.settings["gates"]
    s1 = base["base"]["s1"]
    gain = pilot["before_rl"]["s0"]["pass@1"] - base["base"]["s0"]["pass@1"]
    gates = {"G1": {"value": cal["fork_p_median"], "requirement": f"in {g['fork_p']}",
                    "passed": g["fork_p"][0] <= cal["fork_p_median"] <= g["fork_p"][1]},
             "G2": {"value": {"s1_states_first_equation": s1["states_first_equation"],
                              "s1_pass@1": s1["pass@1"]},
                    "requirement": f">= {g['s1_states']} of S1 samples state the first equation; "
                                   f"S1 pass@1 >= {g['s1_pass']}",
                    "passed": s1["states_first_equation"] >= g["s1_states"]
                    and s1["pass@1"] >= g["s1_pass"]},
             "G3": {"value": {"pilot_s0_pass@1": pilot["before_rl"]["s0"]["pass@1"],
                              "base_s0_pass@1": base["base"]["s0"]["pass@1"], "gain": gain},
                    "requirement": f"pilot SFT S0 pass@1 >= base + {g['sft_gain']}",
                    "passed": gain >= g["sft_gain"]},
             "G4": projection(study, pilot)}
    return {"settings": json.loads(json.dumps(study.settings)), "gates": gates,
            "calibration": cal, "base": base, "pilot": pilot, "redone": redo,
            "seconds": {"base": base["seconds"], "pilot": pilot["seconds"]}}


def projection(study: "Study", pilot: dict) -> dict:
    """G4: projected wall time of the whole study from the unit times measured so far."""
    s, sec = study.settings, pilot["seconds"]
    step = sec["rl"] / sec["rl_steps"]
    post_unit = sec["post_training"] + sec["eval_before"] + step * s["rl"]["steps"] + sec["eval_after"]
    rl_unit = step * s["rl"]["steps"] + sec["eval_after"]
    scale = s["data"]["eval_prompts"] / study.measured_eval_prompts
    post_unit += (sec["eval_before"] + sec["eval_after"]) * (scale - 1)
    rl_unit += sec["eval_after"] * (scale - 1)
    units = len(s["seeds"]) * (5 * post_unit + rl_unit)
    minutes = (study.elapsed() + units / s["workers"] * s["gates"]["contention"] + 60) / 60
    return {"value": {"projected_minutes": minutes, "unit_seconds": {"post-trained": post_unit,
                                                                      "base -> RL": rl_unit},
                      "elapsed_minutes": study.elapsed() / 60},
            "requirement": f"projected total <= {s['gates']['minutes']} min",
            "passed": minutes <= s["gates"]["minutes"]}


class Study:
    """One study's state: settings (gate knobs applied), the work folder, the clock."""

    def __init__(self, out: str, settings: dict, quick: bool, started: float):
        self.out, self.settings, self.quick, self.started = out, settings, quick, started
        self.work = os.path.join(os.path.abspath(out), "work")
        self.measured_eval_prompts = settings["data"]["eval_prompts"]

    def elapsed(self) -> float:
        return time.time() - self.started

    def save_settings(self) -> None:
        with open(os.path.join(self.work, "settings.json"), "w") as f:
            json.dump(self.settings, f, indent=1)

    def gate_units(self, redo: str) -> tuple[dict, dict]:
        """The base's unit (data, base built when ``redo`` is ``base``, its evaluation) and/or
        the pilot SFT's, in one process; ``(base result, pilot result)`` (None: not rerun)."""
        jobs = {"base": ["base", "pilot"], "eval": ["base"], "pilot": ["pilot"]}[redo]
        if redo == "base" and os.path.isdir(paths(self.work)["base"]):
            shutil.rmtree(paths(self.work)["base"])
        if "base" in jobs:
            prepare_data(self.work, self.settings)
        self.save_settings()
        os.makedirs(os.path.join(paths(self.work)["units"], "pilot-sft"), exist_ok=True)
        _subprocess(self.out, ["--jobs", *jobs], os.path.join(self.work, f"gates-{redo}.log"),
                    self.quick)
        base = _load(os.path.join(self.work, "base_result.json")) if "base" in jobs else None
        pilot = (_load(os.path.join(paths(self.work)["units"], "pilot-sft", "result.json"))
                 if "pilot" in jobs else None)
        return base, pilot


def run_gates(study: "Study") -> dict:
    """Gate runs until all pass (or a knob is exhausted, or not enforced: --quick); each run
    is recorded with the knob it changed."""
    runs, redo = [], "base"
    change = "initial settings" if study.quick else CALIBRATED
    g3_steps, g4_ladder = list(G3_STEPS), list(G4_LADDER)
    reruns = study.settings["gates"]["reruns"]
    while True:
        log(f"gate run {len(runs) + 1} ({change})")
        run = gate_run(study, redo, runs[-1] if runs else None)
        run["change"] = change
        runs.append(run)
        gates = run["gates"]
        log("gates: " + ", ".join(f"{k} {'pass' if v['passed'] else 'FAIL'}" for k, v in gates.items()))
        if all(v["passed"] for v in gates.values()) or not study.settings["gates"]["enforced"]:
            break
        if len(runs) > reruns:
            break
        turned = _turn_knob(study, gates, run["calibration"], g3_steps, g4_ladder)
        if turned is None:
            break
        change, redo = turned
    return {"runs": runs, "passed": all(v["passed"] for v in runs[-1]["gates"].values()),
            "enforced": study.settings["gates"]["enforced"]}


def _turn_knob(study: "Study", gates: dict, cal: dict, g3_steps: list, g4_ladder: list):
    """Change the first failed gate's knob (only it): ``(description, what to redo)``, or None
    when its knob is exhausted."""
    s = study.settings
    if not gates["G1"]["passed"]:
        # Proportional to the distance from the design's p ~ 2e-3, at most 4x per run.
        old = s["data"]["compact_share"]
        factor = min(4.0, max(0.25, 2e-3 / cal["fork_p_median"]))
        s["data"]["compact_share"] = round(old * factor, 6)
        return f"G1 failed: compact share {old:g} -> {s['data']['compact_share']:g}", "base"
    if not gates["G2"]["passed"]:
        old = s["data"]["audit_share"]
        s["data"]["audit_share"] = min(0.5, old + 0.1)
        return f"G2 failed: audit share {old:g} -> {s['data']['audit_share']:g}", "base"
    if not gates["G3"]["passed"] and g3_steps:
        old = s["post"]["train_iters"]
        s["post"]["train_iters"] = g3_steps.pop(0)
        return f"G3 failed: post-training steps {old} -> {s['post']['train_iters']}", "pilot"
    if not gates["G4"]["passed"] and g4_ladder:
        section, key, value = g4_ladder.pop(0)
        old, s[section][key] = s[section][key], value
        return (f"G4 failed: {section}.{key} {old} -> {value}",
                "eval" if key == "eval_prompts" else "projection")
    return None


# ---------------------------------------------------------------- main

def run_arms(study: "Study", arm_list: list[dict]) -> None:
    """Every arm x seed, ``workers`` processes at once: one process per unit (a fresh engine
    each); with ``--quick`` the units are split over ``workers`` processes instead (process
    start-up dominates at tiny sizes)."""
    jobs = [f"{arm['name']}:{seed}" for seed in study.settings["seeds"] for arm in arm_list]
    workers = study.settings["workers"]
    groups = [jobs[i::workers] for i in range(workers)] if study.quick else [[j] for j in jobs]

    def run(group):
        name = group[0].replace(":", "-s") + (f"+{len(group) - 1}" if len(group) > 1 else "")
        _subprocess(study.out, ["--jobs", *group],
                    os.path.join(paths(study.work)["units"], name + ".log"), study.quick)
        log(f"done: {', '.join(group)} ({study.elapsed():.0f} s)")

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, group) for group in groups]:
            future.result()


def run_jobs(work: str, jobs: list[str]) -> None:
    """A worker process: ``base`` (the base's unit), ``pilot`` (the pilot SFT) or ``ARM:SEED``
    units, in order."""
    settings = _load(os.path.join(work, "settings.json"))
    for job in jobs:
        if job == "base":
            run_base_unit(work, settings)
        elif job == "pilot":
            run_unit(work, settings, {"name": "pilot-sft", "beta": "inf", "post": True},
                     settings["pilot_seed"], settings["gates"]["timed_rl_steps"], "pilot-sft")
        else:
            name, seed = job.split(":")
            arm = next(a for a in _load(paths(work)["gates"])["arms"] if a["name"] == name)
            run_unit(work, settings, arm, int(seed))


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--quick", action="store_true",
                        help="pipeline check: every stage and arm kind, 1 seed, tiny sizes")
    parser.add_argument("--gates-only", action="store_true",
                        help="data, base, gates and preregistration.md, then stop")
    parser.add_argument("--resume-after-gates", action="store_true",
                        help="run the arms after a completed --gates-only run in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.json, report.md and the plots from --out/work with "
                             "the settings recorded in --out/results.json")
    parser.add_argument("--jobs", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = os.path.join(os.path.abspath(args.out), "work")
    if args.jobs:  # a worker process
        run_jobs(work, args.jobs)
        return
    from report import provenance, write_outputs, write_preregistration

    if args.report_only:
        recorded = _load(os.path.join(args.out, "results.json"))["study"]
        write_outputs(args.out, work, recorded["settings"], recorded["wall_seconds"],
                      recorded["quick"], recorded)
        log(f"rewrote {args.out}/results.json, report.md and plots")
        return
    started = time.time()
    if args.resume_after_gates:
        gates = _load(paths(work)["gates"])
        study = Study(args.out, gates["settings"], gates["quick"], started - gates["seconds"])
    else:
        settings = json.loads(json.dumps(QUICK if args.quick else FULL))
        study = Study(args.out, settings, args.quick, started)
        if os.path.isdir(work):  # a study starts from nothing; the folder is scratch
            shutil.rmtree(work)
        os.makedirs(paths(work)["units"], exist_ok=True)
        log(f"{'quick' if args.quick else 'full'} study in {args.out}; work files in {work}")
        gate_record = run_gates(study)
        cal = gate_record["runs"][-1]["calibration"]
        gates = {"quick": args.quick, "settings": study.settings, "gate_record": gate_record,
                 "calibration": cal, "arms": arms(cal), "provenance": provenance(),
                 "seconds": study.elapsed()}
        gates["preregistration"] = write_preregistration(args.out, gates)
        with open(paths(work)["gates"], "w") as f:
            json.dump(gates, f, indent=1)
        study.save_settings()
        log(f"gates {'passed' if gate_record['passed'] else 'NOT passed'}; beta* = "
            f"{cal['beta_star']:.3f}, w = {gates['arms'][-1]['soft_sft_weight']:.4f}; "
            f"preregistration.md written ({study.elapsed():.0f} s)")
        if args.gates_only:
            return
    run_arms(study, gates["arms"])
    write_outputs(args.out, work, study.settings, study.elapsed(), study.quick, None)
    log(f"wrote {args.out}/results.json, report.md and plots ({study.elapsed():.0f} s)")


if __name__ == "__main__":
    main()
