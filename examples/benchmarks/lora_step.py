"""Training-step cost of LoRA GIFT against full-parameter GIFT on the same model, in one run.

    python examples/benchmarks/lora_step.py                 # 8 layers, hidden 512, seq 512, CPU
    python examples/benchmarks/lora_step.py --lora-rank 16 --rounds 3

Both arms train GIFT (beta 20, Adam) from the same random base checkpoint, each in its own
process (one rank), in turn, ``--rounds`` times: ``full`` (every weight trained, the reference a
second frozen model) and ``LoRA`` (``--lora-rank``: adapters on the four linears of every layer,
the base frozen, the reference the student with its adapters off). Step time: the median over
the steps after the first. Process peak: the worker's resident high-water mark (CPU) or the
accelerator's peak allocation. The bytes each arm holds between steps are read off the trained
job itself: the student's weights, the reference's weights (a LoRA run builds none), the
gradient buffers Megatron-Core's DDP allocates and the optimizer's state tensors.
"""

import json
import os
import statistics
import sys
import tempfile

import torch

from step import KEEP_FREED_MEMORY, model_flags, model_parser, run  # examples/benchmarks/step.py

MIB = 2**20


def worker(argv):
    """Train with ``argv`` in this process; print the held bytes and the peak (JSON)."""
    import resource

    from megatron_gift.config import parse_config
    from megatron_gift.engine import trainer

    jobs = []
    setup = trainer.setup
    trainer.setup = lambda spec: jobs.append(setup(spec)) or jobs[-1]
    trainer.train(parse_config(argv))
    job = jobs[0]
    held = held_bytes(job)
    peak = (torch.accelerator.max_memory_allocated() if torch.accelerator.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({**held, "peak_bytes": peak}))


def held_bytes(job) -> dict:
    """Bytes of the student's weights, the reference's weights, the DDP gradient buffers and
    the optimizer's state tensors."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    students = [c.student for c in job.chunks]
    references = [c.reference for c in job.chunks if c.reference is not None]
    buffers = [b.grad_data for s in students for b in s.buffers + s.expert_parallel_buffers]
    state = [v for o in getattr(job.optimizer, "chained_optimizers", [job.optimizer])
             for s in o.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"student_weights": size(p for s in students for p in s.parameters()),
            "trained_parameters": sum(p.numel() for s in students for p in s.parameters()
                                      if p.requires_grad),
            "reference_weights": size(p for r in references for p in r.parameters()),
            "gradient_buffers": size(buffers), "optimizer_state": size(state)}


def main():
    parser = model_parser(__doc__)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    env = {**KEEP_FREED_MEMORY, **os.environ}
    from megatron_gift.demo import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "demos.jsonl")
        synthetic.write_demonstrations(data, 256, seed=0)
        common = model_flags(args) + ["--train-path", data]
        base = os.path.join(tmp, "base")
        run(common + ["--gift-beta", "inf", "--train-iters", "1", "--optimizer", "sgd",
                      "--save", base], env)
        arms = {"full GIFT": [], f"LoRA GIFT (r={args.lora_rank})": []}
        flags = {"full GIFT": [], f"LoRA GIFT (r={args.lora_rank})":
                 ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank)]}
        for _ in range(args.rounds):
            for name in arms:
                metrics = os.path.join(tmp, "metrics.jsonl")
                result = run_held(common + flags[name] + [
                    "--gift-beta", "20", "--pretrained-checkpoint", base, "--train-iters",
                    str(args.iters), "--metrics-file", metrics], env)
                with open(metrics) as f:
                    result["times"] = [json.loads(line)["step_time"] for line in f
                                       if '"step_time"' in line][1:]
                os.remove(metrics)
                arms[name].append(result)
    report(args, arms)


def run_held(argv, env) -> dict:
    """:func:`worker` in a fresh process; its JSON."""
    import subprocess

    result = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args, arms: dict) -> None:
    print(f"{args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, {args.iters} iterations x {args.rounds} rounds, "
          f"{'accelerator' if torch.accelerator.is_available() else 'CPU'}, "
          f"{torch.get_num_threads()} threads")
    summary = {}
    keys = ("student_weights", "reference_weights", "gradient_buffers", "optimizer_state")
    print(f"{'arm':20s} {'step s':>7s} {'peak MiB':>9s} {'trained':>11s} "
          + " ".join(f"{k.replace('_', ' '):>17s}" for k in keys) + "  (MiB)")
    for name, runs in arms.items():
        step = statistics.median(t for r in runs for t in r["times"])
        peak = max(r["peak_bytes"] for r in runs)
        held = {k: runs[0][k] for k in (*keys, "trained_parameters")}
        summary[name] = {"step_s": step, "peak_mib": peak / MIB, **held}
        print(f"{name:20s} {step:7.3f} {peak / MIB:9.0f} {held['trained_parameters']:11,d} "
              + " ".join(f"{held[k] / MIB:17.1f}" for k in keys))
    (full, full_s), (lora, lora_s) = [(n, s) for n, s in summary.items()]
    print(f"{lora} / {full}: step time {lora_s['step_s'] / full_s['step_s']:.2f}x, peak "
          f"{lora_s['peak_mib'] / full_s['peak_mib']:.2f}x, held between steps "
          f"{sum(lora_s[k] for k in keys) / sum(full_s[k] for k in keys):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
