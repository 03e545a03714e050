"""Training-step cost of GIFT against plain SFT (beta = inf) on the same model, in one run.

    python examples/benchmarks/step.py                  # 8 layers, hidden 512, seq 512, CPU
    python examples/benchmarks/step.py --iters 10 --layers 4

Each configuration trains in its own process (one rank) from the same random base checkpoint;
SFT and GIFT alternate ``--rounds`` times. Step time is the median over iterations after the
first; peak memory is the process's resident high-water mark on CPU, or the accelerator's peak
allocation. GIFT adds a reference forward to every forward+backward: the floor is ~1.33x.
Workers keep freed memory in the process (glibc's MALLOC_* settings, as ``make`` sets them)
unless ``--os-malloc`` asks for the C library's defaults.
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile

import torch


def model_flags(args):
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.heads), "--num-query-groups", str(args.heads),
            "--ffn-hidden-size", str(args.hidden * 11 // 4), "--seq-length", str(args.seq),
            "--micro-batch-size", str(args.micro_batch), "--global-batch-size",
            str(args.micro_batch), "--no-progress", "--eval-interval", "1000000",
            "--overlong", "truncate"] + (
                ["--vocab-size", str(args.vocab_size)] if args.vocab_size else [])


def worker(argv):
    """Train with ``argv`` in this process; print peak memory as the last line (JSON)."""
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    train(parse_config(argv))
    if torch.accelerator.is_available():
        peak = torch.accelerator.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak}))


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "17179869184",
                     "MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_TOP_PAD_": "536870912"}


def run(argv, env):
    result = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The model-size flags :func:`model_flags` reads (8 layers, hidden 512, seq 512)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    return parser


def main():
    parser = model_parser(__doc__)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the model's vocab (default: the bundled tokenizer's 30 words); "
                             "e.g. 128256 for Llama 3's output layer and loss cost")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument("--os-malloc", action="store_true",
                        help="glibc's default malloc settings (freed memory goes back to the OS)")
    parser.add_argument("--extra-flags", default="",
                        help="trainer flags for both runs, e.g. '--fp8-format hybrid'")
    parser.add_argument("--gift-flags", default="",
                        help="trainer flags for the GIFT run only, e.g. "
                             "'--reference-precision fp8 --gift-loss-implementation eager'")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    env = dict(os.environ) if args.os_malloc else {**KEEP_FREED_MEMORY, **os.environ}

    from megatron_gift.demo import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "demos.jsonl")
        synthetic.write_demonstrations(data, 256, seed=0)
        common = model_flags(args) + ["--train-path", data] + (["--bf16"] if args.bf16 else [])
        base = os.path.join(tmp, "base")
        # SGD keeps no optimizer state: the base checkpoint is weights (and fp32 copies) only.
        run(common + ["--gift-beta", "inf", "--train-iters", "1", "--optimizer", "sgd",
                      "--save", base], env)
        common += shlex.split(args.extra_flags)
        results = {"SFT (beta=inf)": [], "GIFT (beta=20)": []}
        gift_flags = ["--gift-beta", "20", "--reference-load", base] + shlex.split(args.gift_flags)
        for _ in range(args.rounds):
            for name, flags in (("SFT (beta=inf)", ["--gift-beta", "inf"]),
                                ("GIFT (beta=20)", gift_flags)):
                metrics = os.path.join(tmp, "metrics.jsonl")
                peak = run(common + flags + ["--pretrained-checkpoint", base, "--train-iters",
                                             str(args.iters), "--metrics-file", metrics], env)
                with open(metrics) as f:
                    times = [json.loads(line)["step_time"] for line in f][1:]
                os.remove(metrics)
                results[name].append((times, peak))

    print(f"{args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, {args.iters} iterations x {args.rounds} rounds, "
          f"{'accelerator' if torch.accelerator.is_available() else 'CPU'}"
          f"{', OS malloc defaults' if args.os_malloc else ''}")
    summary = {}
    for name, runs in results.items():
        step = statistics.median(t for times, _ in runs for t in times)
        peak = max(p for _, p in runs)
        summary[name] = (step, peak)
        print(f"{name:16s} step {step:7.3f} s   peak memory {peak / 2**20:8.0f} MiB")
    (sft_step, sft_peak), (gift_step, gift_peak) = summary.values()
    print(f"GIFT / SFT: step time {gift_step / sft_step:.2f}x (target <= 1.45x, floor ~1.33x), "
          f"peak memory {gift_peak / sft_peak:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sft_step_s": sft_step, "gift_step_s": gift_step, "sft_peak_mib":
                       sft_peak / 2**20, "gift_peak_mib": gift_peak / 2**20,
                       "time_ratio": gift_step / sft_step, "memory_ratio": gift_peak / sft_peak},
                      f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
