"""Training-step cost of the fused GIFT head against the logits head and against SFT with
Megatron-Core's cross-entropy, in one run.

    python examples/benchmarks/head_step.py            # V = 32000 and 128256, seq 2048, CPU
    python examples/benchmarks/head_step.py --vocab-size 32000 --chunk-tokens 256 512

Arms, each trained in its own process (one rank) from the same random base checkpoint, in
turn, ``--rounds`` times:

- ``GIFT fused``: ``--gift-beta 20 --reference-load BASE --gift-head fused``;
- ``GIFT logits``: the same with ``--gift-head logits``;
- ``SFT Megatron CE``: the student alone (``--gift-beta inf --gift-head logits``) with the loss
  of Megatron-Core's GPT models: ``vocab_parallel_cross_entropy`` on the materialised logits
  (``[b, s, V]`` and labels ``[b, s]``, as they come; it casts to fp32 itself and works in
  place), times the loss mask (it has no ignore index: the -100 labels fall outside the vocab
  shard and get loss ``logsumexp``, which the mask zeroes). The trainer has no such loss, so
  this benchmark patches it in: its worker replaces ``megatron_gift.engine.trainer.GiftLoss``
  with :class:`MegatronCrossEntropy` (same returns and metric keys; ``student_entropy`` is NaN,
  as it would need a second pass over the logits);
- ``SFT fused``: ``--gift-beta inf --gift-head fused``, cross-entropy without logits;
- ``GIFT fused, chunk N``: ``GIFT fused`` with ``--gift-head-chunk-tokens N``, for each
  ``--chunk-tokens N`` (the other fused arms take the head's default: one 128 MiB fp32 tile).

The data are synthetic demonstrations, packed (``--pack``) so most positions are loss tokens.

Each run trains ``--iters + 2`` steps. Step time: the median (and range) over the steps after
the first, the last left out, as the trainer records it; the ratios also compare the fastest
steps, the least disturbed on a shared machine. CPU: the process's CPU time over the same
steps (all threads). Process peak: the worker's resident high-water mark
(``resource.getrusage`` ``ru_maxrss``; freed memory stays in the process, see ``step.py``), or
the accelerator's peak allocation. The last step, untimed, measures tensor memory: a
``TorchDispatchMode`` records every storage an aten op creates and ``weakref.finalize`` its
free. *Loss path*: the peak live bytes of the storages created from each model's final hidden
states (the final norm's output) on: the output-layer GEMMs (both models' logits on the logits
head), the loss's buffers and saved tensors, and in the backward everything down to the
gradient of the student's final hidden states (the output weight's gradient included). The
final hidden states themselves are the model's and not counted. *Step tensors*: the peak live
bytes of all storages created during that step (activations, gradients, loss path); what
existed before it (weights, gradient buffers, optimizer state) is not counted. Scratch memory
inside one op is seen by neither.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from step import KEEP_FREED_MEMORY, model_flags  # examples/benchmarks/step.py

MIB = 2**20
GIFT_FUSED, GIFT_LOGITS, SFT_CE, SFT_FUSED = ("GIFT fused", "GIFT logits", "SFT Megatron CE",
                                              "SFT fused")


def make_megatron_cross_entropy():
    """:class:`MegatronCrossEntropy`, a ``GiftLoss`` whose per-token loss is Megatron-Core's."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gift.loss.objectives import GiftLoss

    class MegatronCrossEntropy(GiftLoss):
        """SFT as Megatron-Core's GPT models compute it: ``vocab_parallel_cross_entropy`` on
        the logits ``[b, s, V/tp]``, times the loss mask. Returns what ``GiftLoss`` returns."""

        def __call__(self, logits, reference_logits, batch):
            mask = batch["loss_mask"]
            loss = vocab_parallel_cross_entropy(logits, batch["labels"]) * mask
            num_tokens = mask.sum().to(torch.int)
            count = num_tokens.float()
            with torch.no_grad():
                report = {"loss": loss.sum(),
                          "student_entropy": torch.tensor(math.nan, device=loss.device),
                          "target_mass": mask.sum().float(),
                          "student_label_prob": (torch.exp(-loss) * mask).sum()}
            return loss.sum(), num_tokens, {k: torch.stack([v, count]) for k, v in report.items()}

    return MegatronCrossEntropy


class TensorMemory(TorchDispatchMode):
    """Live bytes of the storages aten ops create while active, and of those created inside
    the loss path (``in_path``); their peaks."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (bytes, in path)
        self.in_path = False
        self.total = self.path = self.peak_total = self.peak_path = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:  # a view, in place, or known
                continue
            self.live[key] = (size, self.in_path)
            self.total += size
            self.path += size if self.in_path else 0
            self.peak_total, self.peak_path = (max(self.peak_total, self.total),
                                               max(self.peak_path, self.path))
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        size, in_path = self.live.pop(key)
        self.total -= size
        self.path -= size if in_path else 0


def measured_step(train_step, memory: TensorMemory):
    """``train_step`` with ``memory`` active and the loss path marked on every chunk: from
    each model's decoder output (after the final norm) to the end of the reference's forward,
    and to the gradient of the student's decoder output."""
    from megatron_gift.core.model import unwrap

    def enter(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        memory.in_path = True
        if hidden.requires_grad:
            hidden.register_hook(leave_student)

    def leave_student(grad):
        memory.in_path = False

    def leave_reference(module, inputs, output):
        memory.in_path = False

    def step(job):
        handles = []
        for chunk in job.chunks:
            if not chunk.post_process:
                continue
            handles.append(unwrap(chunk.student).decoder.register_forward_hook(enter))
            if chunk.reference is not None:
                handles.append(unwrap(chunk.reference).decoder.register_forward_hook(enter))
                handles.append(chunk.reference.register_forward_hook(leave_reference))
        try:
            with memory:
                return train_step(job)
        finally:
            for handle in handles:
                handle.remove()

    return step


def worker(argv):
    """Train with ``argv`` (after ``--megatron-ce``: with :class:`MegatronCrossEntropy`); the
    last step measures tensor memory. Prints the memory numbers as the last line (JSON)."""
    from megatron_gift.config import parse_config
    from megatron_gift.engine import trainer

    if argv[:1] == ["--megatron-ce"]:
        trainer.GiftLoss = make_megatron_cross_entropy()
        argv = argv[1:]
    config = parse_config(argv)
    memory, cpu_times = TensorMemory(), []
    plain, measured = trainer._train_step, measured_step(trainer._train_step, memory)

    def train_step(job):
        start = time.process_time()
        last = len(cpu_times) + 1 == config.training.train_iters
        out = (measured if last else plain)(job)
        cpu_times.append(time.process_time() - start)
        return out

    trainer._train_step = train_step
    trainer.train(config)
    if torch.accelerator.is_available():
        peak = torch.accelerator.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "loss_path_bytes": memory.peak_path,
                      "step_tensor_bytes": memory.peak_total, "cpu_times": cpu_times[1:-1]}))


def run(argv, env):
    result = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def arms(args, base):
    """``{name: (worker flags before the trainer's, trainer flags)}``."""
    gift = ["--gift-beta", "20", "--reference-load", base]
    out = {GIFT_FUSED: ([], gift + ["--gift-head", "fused"]),
           GIFT_LOGITS: ([], gift + ["--gift-head", "logits"]),
           SFT_CE: (["--megatron-ce"], ["--gift-beta", "inf", "--gift-head", "logits"])}
    if not args.no_sft_fused:
        out[SFT_FUSED] = ([], ["--gift-beta", "inf", "--gift-head", "fused"])
    for n in args.chunk_tokens:
        out[f"{GIFT_FUSED}, chunk {n}"] = ([], gift + ["--gift-head", "fused",
                                                       "--gift-head-chunk-tokens", str(n)])
    return out


def bench_vocab(args, vocab, env, tmp):
    """``{arm: {"step", "peak", "loss_path", "step_tensors"}}`` at one vocab size."""
    args.vocab_size = vocab
    data = os.path.join(tmp, "demos.jsonl")
    common = model_flags(args) + ["--train-path", data] + (["--pack"] if args.pack else [])
    base = os.path.join(tmp, f"base-{vocab}")
    # SGD keeps no optimizer state: the base checkpoint is weights (and fp32 copies) only.
    run(common + ["--gift-beta", "inf", "--train-iters", "1", "--optimizer", "sgd",
                  "--save", base], env)
    plan = arms(args, base)
    runs = {name: [] for name in plan}
    for _ in range(args.rounds):
        for name, (pre, flags) in plan.items():
            metrics = os.path.join(tmp, "metrics.jsonl")
            out = run(pre + common + flags + [
                "--pretrained-checkpoint", base, "--train-iters", str(args.iters + 2),
                "--metrics-file", metrics], env)
            with open(metrics) as f:
                out["times"] = [json.loads(line)["step_time"] for line in f][1:-1]
            os.remove(metrics)
            runs[name].append(out)
    return {name: {"step": statistics.median(t for r in rs for t in r["times"]),
                   "cpu": statistics.median(t for r in rs for t in r["cpu_times"]),
                   "spread": (min(t for r in rs for t in r["times"]),
                              max(t for r in rs for t in r["times"])),
                   "peak": max(r["peak_bytes"] for r in rs),
                   "loss_path": max(r["loss_path_bytes"] for r in rs),
                   "step_tensors": max(r["step_tensor_bytes"] for r in rs)}
            for name, rs in runs.items()}


def print_table(vocab, rows, args):
    device = "accelerator" if torch.accelerator.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\nV={vocab}: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}{', packed' if args.pack else ''}, {args.iters} timed steps x "
          f"{args.rounds} rounds, {device}")
    print(f"{'arm':24s} {'step s':>7s} {'(min-max)':>13s} {'CPU s':>7s} {'process peak MiB':>17s} "
          f"{'loss path MiB':>14s} {'step tensors MiB':>17s}")
    for name, r in rows.items():
        spread = f"({r['spread'][0]:.2f}-{r['spread'][1]:.2f})"
        print(f"{name:24s} {r['step']:7.3f} {spread:>13s} {r['cpu']:7.2f} {r['peak'] / MIB:17.0f} "
              f"{r['loss_path'] / MIB:14.1f} {r['step_tensors'] / MIB:17.1f}")

    def ratios(a, b):
        x, y = rows[a], rows[b]
        return (f"step time {x['step'] / y['step']:.2f}x (fastest steps "
                f"{x['spread'][0] / y['spread'][0]:.2f}x, CPU {x['cpu'] / y['cpu']:.2f}x), loss "
                f"path {x['loss_path'] / y['loss_path']:.2f}x, process peak "
                f"{x['peak'] / y['peak']:.2f}x, step tensors "
                f"{x['step_tensors'] / y['step_tensors']:.2f}x")

    fused = [name for name in rows if name.startswith(GIFT_FUSED)]
    for name in fused:
        print(f"{name} / {GIFT_LOGITS}: {ratios(name, GIFT_LOGITS)}  (goal: time <= 1.1x)")
    for name in fused:
        print(f"{name} / {SFT_CE}: {ratios(name, SFT_CE)}  (goal: loss path < 1x)")
    if SFT_FUSED in rows:
        print(f"{SFT_FUSED} / {SFT_CE}: {ratios(SFT_FUSED, SFT_CE)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3,
                        help="timed steps per run (each run trains two more: the first, and "
                             "the last, which measures tensor memory)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, nargs="*", default=[],
                        help="also run GIFT fused with these --gift-head-chunk-tokens")
    parser.add_argument("--no-sft-fused", action="store_true", help="leave out SFT fused")
    parser.add_argument("--no-pack", dest="pack", action="store_false",
                        help="one demonstration per sequence, the rest padding (default: "
                             "packed, so most positions are loss tokens)")
    parser.add_argument("--demos", type=int, default=1024, help="synthetic demonstrations")
    parser.add_argument("--os-malloc", action="store_true",
                        help="glibc's default malloc settings (freed memory goes back to the OS)")
    parser.add_argument("--json", help="also write the tables to this file")
    args = parser.parse_args()
    env = dict(os.environ) if args.os_malloc else {**KEEP_FREED_MEMORY, **os.environ}

    from megatron_gift.demo import synthetic

    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_demonstrations(os.path.join(tmp, "demos.jsonl"), args.demos, seed=0)
        for vocab in args.vocab_size:
            tables[vocab] = bench_vocab(args, vocab, env, tmp)
            print_table(vocab, tables[vocab], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(v): rows for v, rows in tables.items()}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
