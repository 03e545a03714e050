"""Does GIFT beat SFT as the initialisation for RL? The paper's chain at small scale, on CPU.

::

    python examples/reproduce/run.py --out results/reproduction          # the study (make reproduce)
    python examples/reproduce/run.py --quick --out /tmp/repro-quick      # pipeline check, 1 seed

1. Base: a tiny Llama pretrained on arithmetic chains (``megatron_gift.demo.chains``), solutions in
   three styles; two-step chains mostly, three-step chains a quarter of the time.
2. Post-training from that base, through this project's engine, on the same one-style
   (stepwise) two-step demonstrations with the same steps and learning rate: SFT (beta = inf)
   and GIFT at each beta of ``ARMS``.
3. RL from each: GRPO (``grpo.py``, group 8, KL 0, answer reward) on two-step chains.
4. Evaluation before and after RL (``megatron_gift.evaluate``): pass@k in distribution
   (two-step) and out of distribution (three-step chains, held out of post-training and RL),
   entropy, solution styles, KL to the base; GIFT's per-token target on the demonstrations.
5. Seeds (post-training data order and RL sampling) per arm; means with 95% t-intervals; GIFT
   minus SFT paired by seed.

Writes ``results.json``, ``report.md`` and PNG plots under ``--out``; checkpoints and exports go
to ``--out/work`` (not for committing). ``--quick``: one seed, SFT and one GIFT arm, few steps.
``--report-only`` rewrites the outputs from ``--out/work`` without training anything.
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

# The study's settings, fixed before any arm was compared (see report.md, "Design").
FULL = {
    "arms": [["sft", "inf"], ["gift-beta1", 1.0], ["gift-beta2", 2.0], ["gift-beta5", 5.0],
             ["gift-beta20", 20.0]],
    "seeds": [0, 1, 2],
    "data": {"corpus": 12000, "long_share": 0.25, "demonstrations": 2000, "eval_prompts": 200},
    "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 176, "seq_length": 64},
    "base": {"train_iters": 1200, "micro_batch_size": 16, "global_batch_size": 32,
             "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 20, "seed": 1234},
    "post": {"train_iters": 60, "micro_batch_size": 8, "global_batch_size": 16, "lr": 1e-3},
    "rl": {"steps": 100, "prompts": 16, "group": 8, "lr": 1e-4, "max_new_tokens": 24},
    "eval": {"samples": 16, "max_new_tokens": {"id": 24, "ood": 40}},
}
QUICK = {**FULL, "arms": [["sft", "inf"], ["gift-beta2", 2.0]], "seeds": [0],
         "data": {"corpus": 1200, "long_share": 0.25, "demonstrations": 200, "eval_prompts": 16},
         "base": {**FULL["base"], "train_iters": 30},
         "post": {**FULL["post"], "train_iters": 6},
         "rl": {**FULL["rl"], "steps": 3, "prompts": 4},
         "eval": {"samples": 8, "max_new_tokens": {"id": 24, "ood": 40}}}
DIAGNOSTIC_BETAS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]


def beta_value(beta):
    return math.inf if beta == "inf" else float(beta)


def log(message):
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def paths(work):
    data = os.path.join(work, "data")
    return {"data": data, "corpus": os.path.join(data, "corpus.jsonl"),
            "demos": os.path.join(data, "demonstrations.jsonl"),
            "id": os.path.join(data, "eval_two_step.jsonl"),
            "ood": os.path.join(data, "eval_three_step.jsonl"),
            "base": os.path.join(work, "base"), "units": os.path.join(work, "units")}


def prepare_data(work, settings):
    """The world's files (fixed seeds): pretraining solutions, demonstrations, eval prompts."""
    from megatron_gift.demo import chains

    p, d = paths(work), settings["data"]
    os.makedirs(p["data"], exist_ok=True)
    # Pretraining solutions as prompt/response records (loss on the solution): the base sees
    # questions exactly as post-training, RL and evaluation show them (one encoding: prompt_ids).
    with open(p["corpus"], "w") as f:
        import random

        rng = random.Random(1234)
        for _ in range(d["corpus"]):
            steps = 3 if rng.random() < d["long_share"] else 2
            prompt, responses = chains.chain_problem(rng, steps)
            f.write(json.dumps({"prompt": prompt,
                                "response": responses[rng.choice(chains.STYLES)]}) + "\n")
    chains.write_problems(p["demos"], d["demonstrations"], seed=1235, steps=2)
    chains.write_problems(p["id"], d["eval_prompts"], seed=1236, steps=2, unique=True)
    chains.write_problems(p["ood"], d["eval_prompts"], seed=1237, steps=3, unique=True)


def engine(overrides, argv=(), log_path=None):
    """Run this project's trainer in a process of its own (one rank, one thread)."""
    code = ("import json, sys\n"
            "from megatron_gift.config import parse_config\n"
            "from megatron_gift.engine.trainer import train\n"
            "train(parse_config(sys.argv[2:], defaults=json.loads(sys.argv[1])))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    with open(log_path or os.devnull, "w") as out:
        result = subprocess.run([sys.executable, "-c", code, json.dumps(overrides), *argv],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode}); see {log_path}")


def build_base(work, settings):
    p, b = paths(work), settings["base"]
    engine({"model": settings["model"], "gift": {"beta": 1.0},
            "data": {"train_path": p["corpus"]},
            "training": {k: b[k] for k in ("train_iters", "micro_batch_size", "global_batch_size",
                                           "seed")} | {"eval_interval": 100000},
            "optimizer": {"lr": b["lr"], "min_lr": b["min_lr"], "lr_warmup_iters": b["lr_warmup_iters"]},
            "checkpoint": {"save": p["base"]},
            "logging": {"metrics_file": os.path.join(work, "base_metrics.jsonl"), "progress": False}},
           argv=["gift.beta=inf"], log_path=os.path.join(work, "base.log"))


def post_train(work, settings, name, beta, seed):
    p, s = paths(work), settings["post"]
    unit = os.path.join(p["units"], f"{name}-s{seed}")
    os.makedirs(unit, exist_ok=True)
    engine({"model": settings["model"], "data": {"train_path": p["demos"]},
            "training": {"train_iters": s["train_iters"], "micro_batch_size": s["micro_batch_size"],
                         "global_batch_size": s["global_batch_size"], "seed": 100 + seed,
                         "eval_interval": 100000},
            "optimizer": {"lr": s["lr"], "min_lr": s["lr"], "lr_decay_style": "constant"},
            "checkpoint": {"pretrained_checkpoint": p["base"], "save": os.path.join(unit, "ckpt")},
            "logging": {"metrics_file": os.path.join(unit, "post_metrics.jsonl"), "progress": False}},
           argv=[f"gift.beta={beta}"], log_path=os.path.join(unit, "post.log"))
    return unit


def evaluate_stage(model, tokenizer, work, settings, base_model, seed):
    """pass@k, entropy, styles and KL to the base on both evaluation sets."""
    from megatron_gift.demo.chains import classify_style
    from megatron_gift.evaluation.policy import evaluate_policy, read_records

    p, e = paths(work), settings["eval"]
    result = {}
    for split in ("id", "ood"):
        r = evaluate_policy(model, tokenizer, read_records(p[split]), e["samples"],
                            e["max_new_tokens"][split], "answer", 50_000 + seed, base_model,
                            style_of=classify_style)
        result[split] = {k: r[k] for k in ("pass@1", "pass@k", "entropy", "length", "styles",
                                           "kl_to_reference", "examples")}
    return result


def run_unit(work, settings, name, beta, seed):
    """One arm and seed: post-training, export, evaluation, GRPO, evaluation."""
    import torch

    from grpo import GRPOSettings, grpo
    from megatron_gift.evaluation.sampling import load_policy

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    started = time.time()
    unit = post_train(work, settings, name, beta, seed)
    post_seconds = time.time() - started
    model, tokenizer = load_policy(os.path.join(unit, "ckpt"), os.path.join(unit, "hf"))
    # An export of the base per run: two runs at once never read a half-written one.
    base_model, _ = load_policy(os.path.join(work, "base"), os.path.join(unit, "base_hf"))
    before = evaluate_stage(model, tokenizer, work, settings, base_model, seed)
    rl_started = time.time()
    curve = grpo(model, tokenizer, GRPOSettings(**settings["rl"]), seed)
    rl_seconds = time.time() - rl_started
    after = evaluate_stage(model, tokenizer, work, settings, base_model, seed)
    with open(os.path.join(unit, "post_metrics.jsonl")) as f:
        post = [json.loads(line) for line in f if line.strip()]
    result = {"seed": seed, "before_rl": flatten(before), "after_rl": flatten(after),
              "rl_curve": [c["reward"] for c in curve],
              "post_training": {k: [r.get(k) for r in post] for k in
                                ("loss", "student_entropy", "target_mass", "student_label_prob")},
              "seconds": {"post_training": post_seconds, "rl": rl_seconds,
                          "total": time.time() - started}}
    with open(os.path.join(unit, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def flatten(stage):
    """In-distribution metrics at the top level (``pass@1``, ``pass@k``, ...), the
    out-of-distribution ones under ``ood``."""
    return {**{k: v for k, v in stage["id"].items()}, "ood": stage["ood"]}


def run_base_unit(work, settings):
    """The base's own evaluation and GIFT's per-token target on the demonstrations."""
    import torch

    from megatron_gift.evaluation.policy import gift_token_diagnostics, read_records
    from megatron_gift.evaluation.sampling import load_policy

    torch.set_num_threads(1)
    model, tokenizer = load_policy(os.path.join(work, "base"), os.path.join(work, "base_hf"))
    stage = flatten(evaluate_stage(model, tokenizer, work, settings, model, 0))
    demos = read_records(paths(work)["demos"], limit=500)
    diagnostics = gift_token_diagnostics(model, tokenizer, demos, DIAGNOSTIC_BETAS)
    result = {"base": stage, "gift_tokens": diagnostics}
    with open(os.path.join(work, "base_result.json"), "w") as f:
        json.dump(result, f)
    return result


def _subprocess(args, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as out:
        code = subprocess.run([sys.executable, os.path.abspath(__file__), *args], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {code}); see {log_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--quick", action="store_true", help="one seed, two arms, few steps")
    parser.add_argument("--workers", type=int, default=2, help="arm/seed runs at once")
    parser.add_argument("--post-lr", type=float,
                        help="post-training learning rate of every arm (a sensitivity study; "
                             f"default {FULL['post']['lr']:g})")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.json, report.md and the plots from --out/work "
                             "(keeps the wall time the study measured)")
    parser.add_argument("--unit", nargs=3, metavar=("NAME", "BETA", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--base-unit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.post_lr is not None:
        settings = {**settings, "post": {**settings["post"], "lr": args.post_lr}}
    work = os.path.join(os.path.abspath(args.out), "work")
    if args.unit:
        name, beta, seed = args.unit
        run_unit(work, settings, name, beta, int(seed))
        return
    if args.base_unit:
        run_base_unit(work, settings)
        return
    if args.report_only:
        from report import write_outputs

        with open(os.path.join(args.out, "results.json")) as f:
            seconds = json.load(f)["study"]["wall_seconds"]
        write_outputs(args.out, work, settings, seconds, quick=args.quick)
        log(f"rewrote {args.out}/results.json, report.md and plots")
        return

    started = time.time()
    if os.path.isdir(work):  # a study starts from nothing; the folder is scratch
        shutil.rmtree(work)
    os.makedirs(paths(work)["units"], exist_ok=True)
    log(f"{'quick' if args.quick else 'full'} study in {args.out}; work files in {work} "
        "(replaced on every run)")
    prepare_data(work, settings)
    build_base(work, settings)
    log(f"base model built ({time.time() - started:.0f} s)")
    jobs = [("base", None, None)] + [(name, beta, seed) for seed in settings["seeds"]
                                     for name, beta in settings["arms"]]
    quick = (["--quick"] if args.quick else []) + \
        (["--post-lr", repr(args.post_lr)] if args.post_lr is not None else [])

    def run(job):
        name, beta, seed = job
        if name == "base":
            _subprocess(["--out", args.out, "--base-unit", *quick], os.path.join(work, "base_eval.log"))
        else:
            os.makedirs(os.path.join(paths(work)["units"], f"{name}-s{seed}"), exist_ok=True)
            _subprocess(["--out", args.out, "--unit", name, str(beta), str(seed), *quick],
                        os.path.join(paths(work)["units"], f"{name}-s{seed}", "unit.log"))
        log(f"done: {name}" + (f" seed {seed}" if seed is not None else "")
            + f" ({time.time() - started:.0f} s)")

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for future in [pool.submit(run, job) for job in jobs]:
            future.result()
    from report import write_outputs

    write_outputs(args.out, work, settings, time.time() - started, quick=args.quick)
    log(f"wrote {args.out}/results.json, report.md and plots ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
