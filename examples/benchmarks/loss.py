"""Forward+backward cost of the GIFT loss (each implementation that can run here) against
Megatron-Core's cross-entropy and the authors' plain full-vocab formula, measured side by side in
one run (ratios, so a noisy machine stays comparable).

    python examples/benchmarks/loss.py                     # s=512, b=2, V=32000, bf16, on CPU
    python examples/benchmarks/loss.py --device cuda --seq 8192 --batch 1 \\
        --vocab 152064 19008 32000                         # the GPU targets (19008: V/8 at TP=8)

Time is the median over interleaved repetitions; "saved" is what autograd keeps for the
backward (bytes of the tensors packed by saved_tensors_hooks, each storage counted once).
"""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_gift.loss import vocab_parallel_gift_loss
from megatron_gift.loss.passes import triton_can_run

CROSS_ENTROPY, PLAIN = "megatron cross-entropy", "plain formula (authors')"
# Targets of GIFT / cross-entropy time per implementation (the fused kernels on a GPU; the eager
# passes were measured on CPU), of GIFT / plain-formula time, and of saved bytes.
TIME_TARGETS = {"triton": 1.3, "eager": 2.0}
PLAIN_TARGET, SAVED_TARGET = 0.6, 1.15


def megatron_cross_entropy(logits, ref_logits, labels, beta):
    return vocab_parallel_cross_entropy(logits, labels)


def plain_formula(logits, ref_logits, labels, beta, smooth_lambda=0.0):
    """The official trainer's math (verl fork), full vocab, fp32 softmaxes as under autocast."""
    with torch.no_grad():
        p_ref = torch.softmax(ref_logits.float(), -1)
        p_ref = (1 - smooth_lambda) * p_ref + smooth_lambda / p_ref.size(-1)
        shifted = torch.log(p_ref + 1e-10)
        boost = torch.full_like(labels, beta, dtype=shifted.dtype).unsqueeze(-1)
        shifted.scatter_add_(-1, labels.unsqueeze(-1), boost)
        target = torch.softmax(shifted, -1)
    return -(target * torch.log_softmax(logits.float(), -1)).sum(-1)


def gift(implementation):
    def loss(logits, ref_logits, labels, beta):
        return vocab_parallel_gift_loss(logits, ref_logits, labels, beta=beta,
                                        implementation=implementation, check_labels=False)
    return loss


def implementations(device: torch.device) -> list[str]:
    """The GIFT loss implementations that can run on ``device``."""
    return (["triton"] if triton_can_run(device) is None else []) + ["eager"]


def saved_bytes(fn, logits, ref_logits, labels, beta):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(logits, ref_logits, labels, beta)
    loss.sum().backward()
    logits.grad = None
    return sum(storages.values())


def step(fn, logits, ref_logits, labels, beta, device):
    if device.type != "cpu":
        torch.accelerator.synchronize()
    start = time.perf_counter()
    fn(logits, ref_logits, labels, beta).sum().backward()
    if device.type != "cpu":
        torch.accelerator.synchronize()
    logits.grad = None
    return time.perf_counter() - start


def measure(seq: int, batch: int, vocab: int, dtype: torch.dtype, device: torch.device,
            beta: float = 20.0, repeats: int = 7, plain: bool = True) -> dict:
    """One shape: ``{"rows": {loss: {"ms", "saved_mib"}}, "ratios": {...}}``, every candidate
    timed in the same interleaved rounds. Needs a process group (see :func:`world_of_one`)."""
    g = torch.Generator().manual_seed(0)
    shape = (seq, batch, vocab)
    logits = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    ref_logits = (2 * torch.randn(shape, generator=g)).to(device, dtype)
    labels = torch.randint(0, vocab, shape[:-1], generator=g).to(device)
    candidates = {CROSS_ENTROPY: megatron_cross_entropy}
    if plain:
        candidates[PLAIN] = plain_formula
    candidates.update({f"megatron_gift {name}": gift(name) for name in implementations(device)})
    times = {name: [] for name in candidates}
    for repeat in range(repeats + 1):
        for name, fn in candidates.items():
            elapsed = step(fn, logits, ref_logits, labels, beta, device)
            if repeat:  # the first round warms up allocators and compiles kernels
                times[name].append(elapsed)
    rows = {name: {"ms": 1e3 * statistics.median(times[name]),
                   "saved_mib": saved_bytes(fn, logits, ref_logits, labels, beta) / 2**20}
            for name, fn in candidates.items()}
    ratios = {}
    for name in implementations(device):
        ours = rows[f"megatron_gift {name}"]
        ratios[f"{name} time vs cross-entropy"] = (
            ours["ms"] / rows[CROSS_ENTROPY]["ms"], TIME_TARGETS[name])
        if plain:
            ratios[f"{name} time vs plain formula"] = (ours["ms"] / rows[PLAIN]["ms"], PLAIN_TARGET)
        ratios[f"{name} saved vs cross-entropy"] = (
            ours["saved_mib"] / rows[CROSS_ENTROPY]["saved_mib"], SAVED_TARGET)
    return {"shape": f"s={seq} b={batch} V={vocab} {str(dtype).removeprefix('torch.')}",
            "rows": rows, "ratios": ratios}


def print_result(result: dict) -> bool:
    """Print one :func:`measure` result; True when every ratio meets its target."""
    print(f"\n{result['shape']}")
    print(f"{'loss':28s} {'time ms':>9s} {'saved MiB':>10s}")
    for name, row in result["rows"].items():
        print(f"{name:28s} {row['ms']:9.2f} {row['saved_mib']:10.1f}")
    met = True
    for name, (value, target) in result["ratios"].items():
        verdict = "ok" if value <= target else "MISSED"
        met &= value <= target
        print(f"{name:34s} {value:5.2f}x  (target <= {target}x: {verdict})")
    return met


def world_of_one(device: torch.device) -> None:
    """A one-rank process group and Megatron's parallel state (its cross-entropy reduces over
    the tensor-parallel group); a no-op where this process has them already."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(rank=0, world_size=1,
                            device_id=device if device.type != "cpu" else None)
    parallel_state.initialize_model_parallel()


def default_device(name=None) -> torch.device:
    device = torch.device(name) if name else (
        torch.accelerator.current_accelerator() if torch.accelerator.is_available()
        else torch.device("cpu"))
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--beta", type=float, default=20.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default=None,
                        help="torch device; default: the accelerator if there is one, else cpu")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    device = default_device(args.device)
    world_of_one(device)
    print(f"fwd+bwd, beta={args.beta}, on {device} ({torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    results = [measure(args.seq, args.batch, vocab, getattr(torch, args.dtype), device,
                       args.beta, args.repeats) for vocab in args.vocab]
    met = all([print_result(result) for result in results])
    if device.type != "cpu":
        print(f"peak accelerator memory {torch.accelerator.max_memory_allocated() / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    raise SystemExit(main())
