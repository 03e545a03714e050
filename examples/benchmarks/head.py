"""Forward+backward of the output layer plus loss, three ways, at one shape per vocab size:

- ``fused``: :func:`megatron_gift.loss.fused_head.fused_gift_head_loss` (no ``[T, V]`` logits);
- ``gift logits``: both models' logits GEMMs, then ``vocab_parallel_gift_loss``;
- ``ce logits``: the student's logits GEMM, then Megatron-Core's ``vocab_parallel_cross_entropy``.

    python examples/benchmarks/head.py                         # T=2048 H=1024 V=32000,128256
    python examples/benchmarks/head.py --device cuda --dtype bfloat16

Memory: on an accelerator the peak allocated bytes of the step (inputs excluded); on CPU, where
torch's allocator has no counter, each path runs in a fresh process and reports how far the step
raised the process's peak RSS (``resource.getrusage``), beside the theoretical bytes of the
``[T, V]`` / accumulator buffers each path allocates. Time: the median of ``--repeats`` steps
after the one that measured memory. Prints ratios against the two logits paths.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from loss import world_of_one  # examples/benchmarks/loss.py: a one-rank group and Megatron's state

PATHS = ("fused", "gift logits", "ce logits")
MIB = 2**20


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    scale = hidden ** -0.5
    return {
        "h": torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_(),
        "w": (2 * scale * torch.randn(vocab, hidden, generator=g)).to(device, dtype)
        .requires_grad_(),
        "h_ref": torch.randn(tokens, hidden, generator=g).to(device, dtype),
        "w_ref": (2 * scale * torch.randn(vocab, hidden, generator=g)).to(device, dtype),
        "y": torch.randint(0, vocab, (tokens,), generator=g).to(device),
    }


def path_fn(name: str, beta: float, chunk_tokens: Optional[int]) -> Callable[[dict], torch.Tensor]:
    """The per-token loss of one path, from the inputs of :func:`make_inputs`."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gift.loss import vocab_parallel_gift_loss
    from megatron_gift.loss.fused_head import fused_gift_head_loss

    def fused(x):
        return fused_gift_head_loss(x["h"], x["w"], x["y"], x["h_ref"], x["w_ref"], beta=beta,
                                    chunk_tokens=chunk_tokens, check_labels=False)

    def gift_logits(x):
        with torch.no_grad():
            ref = x["h_ref"] @ x["w_ref"].T
        return vocab_parallel_gift_loss(x["h"] @ x["w"].T, ref, x["y"], beta=beta,
                                        check_labels=False)

    def ce_logits(x):
        return vocab_parallel_cross_entropy(x["h"] @ x["w"].T, x["y"])

    return {"fused": fused, "gift logits": gift_logits, "ce logits": ce_logits}[name]


def theoretical_bytes(name: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                      chunk_tokens: Optional[int], on_cuda: bool = False) -> int:
    """The big buffers a path allocates beyond its inputs and the output grads (``[T, V]``
    logits, fp32 loss buffers; the fused path's chunk tiles and fp32 accumulators)."""
    item = torch.empty((), dtype=dtype).element_size()
    tv = tokens * vocab
    if name == "fused":
        from megatron_gift.loss.fused_head import default_chunk_tokens

        tile = min(chunk_tokens or default_chunk_tokens(vocab), tokens) * vocab * 4
        # bf16 weights: CUDA multiplies them as they are (out_dtype GEMMs), CPU copies to fp32.
        fp32_weights = 0 if dtype == torch.float32 or on_cuda else 2 * vocab * hidden * 4
        return 3 * tile + (tokens * hidden + vocab * hidden) * 4 + fp32_weights
    if name == "gift logits":  # z, r, fp32 gap saved, fp32 workspace chunks, grad of z
        return 2 * tv * item + tv * 4 + tv * item
    return tv * item + tv * 4 + tv * item  # z, softmax kept by Megatron's CE (fp32), grad of z


def step(fn, x, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn(x).sum().backward()
    sync(device)
    x["h"].grad = x["w"].grad = None
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def measure(name: str, args, vocab: int, device: torch.device) -> dict:
    """``{"ms", "peak_mib", "theory_mib"}`` of one path; peak: accelerator bytes allocated
    by the step, or on CPU the rise of this process's peak RSS during the first step."""
    dtype = getattr(torch, args.dtype)
    x = make_inputs(args.tokens, args.hidden, vocab, dtype, device)
    fn = path_fn(name, args.beta, args.chunk_tokens)
    if device.type != "cpu":
        step(fn, x, device)  # warm-up (kernels, allocator)
        torch.accelerator.reset_peak_memory_stats()
        base = torch.accelerator.memory_allocated()
        step(fn, x, device)
        peak = torch.accelerator.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(fn, x, device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [step(fn, x, device) for _ in range(args.repeats)]
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / MIB,
            "theory_mib": theoretical_bytes(name, args.tokens, args.hidden, vocab, dtype,
                                            args.chunk_tokens, device.type == "cuda") / MIB}


def default_device(name=None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def run_in_child(name: str, vocab: int) -> dict:
    """:func:`measure` in a fresh process (CPU: its peak RSS is this path's alone)."""
    argv = [sys.executable, os.path.abspath(__file__), "--only", name, "--vocab", str(vocab)]
    argv += _passthrough()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


_ARGS = None


def _passthrough() -> list[str]:
    a = _ARGS
    return ["--tokens", str(a.tokens), "--hidden", str(a.hidden), "--beta", str(a.beta),
            "--dtype", a.dtype, "--repeats", str(a.repeats)] + (
                ["--chunk-tokens", str(a.chunk_tokens)] if a.chunk_tokens else []) + (
                ["--device", a.device] if a.device else [])


def print_table(vocab: int, rows: dict, args) -> None:
    print(f"\nT={args.tokens} H={args.hidden} V={vocab} {args.dtype} beta={args.beta} "
          f"chunk={args.chunk_tokens}")
    print(f"{'path':12s} {'time ms':>10s} {'peak MiB':>10s} {'theory MiB':>11s}")
    for name, row in rows.items():
        print(f"{name:12s} {row['ms']:10.1f} {row['peak_mib']:10.1f} {row['theory_mib']:11.1f}")
    fused = rows["fused"]
    for other in PATHS[1:]:
        print(f"fused / {other:12s} time {fused['ms'] / rows[other]['ms']:5.2f}x   "
              f"peak {fused['peak_mib'] / max(rows[other]['peak_mib'], 1e-9):5.2f}x   "
              f"theory {fused['theory_mib'] / rows[other]['theory_mib']:5.2f}x")


def main() -> int:
    global _ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--beta", type=float, default=20.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="default: the fused head's (a 128 MiB fp32 tile)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", choices=PATHS, help=argparse.SUPPRESS)
    args = _ARGS = parser.parse_args()
    device = default_device(args.device)
    if args.only:  # a child: one path, one vocab, one JSON line
        world_of_one(device)
        print(json.dumps(measure(args.only, args, args.vocab[0], device)))
        return 0
    print(f"fwd+bwd on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    for vocab in args.vocab:
        print_table(vocab, {name: run_in_child(name, vocab) for name in PATHS}, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
