"""Forward+backward cost of the GIFT loss against Megatron-Core's cross-entropy and the authors'
plain full-vocab formula, measured in one run (ratios, so a noisy machine stays comparable).

    python examples/benchmarks/loss.py                   # s=512, b=2, V=32000, bf16, on CPU
    python examples/benchmarks/loss.py --device cuda --seq 4096 --vocab 152064

Time is the median over interleaved repetitions; "saved" is what autograd keeps for the
backward (bytes of the tensors packed by saved_tensors_hooks, each storage counted once).
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_gift.loss import vocab_parallel_gift_loss

TARGETS = {"time vs cross-entropy": 2.0, "time vs plain formula": 0.6,
           "saved vs cross-entropy": 1.15}


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


def gift(logits, ref_logits, labels, beta):
    return vocab_parallel_gift_loss(logits, ref_logits, labels, beta=beta)


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
    start = time.perf_counter()
    fn(logits, ref_logits, labels, beta).sum().backward()
    if device.type != "cpu":
        torch.accelerator.synchronize()
    logits.grad = None
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--beta", type=float, default=20.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default=None,
                        help="torch device; default: the accelerator if there is one, else cpu")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else (
        torch.accelerator.current_accelerator() if torch.accelerator.is_available()
        else torch.device("cpu"))
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())

    # Megatron's cross-entropy reduces over the tensor-parallel group: a world of one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(rank=0, world_size=1,
                            device_id=device if device.type != "cpu" else None)
    parallel_state.initialize_model_parallel()

    g = torch.Generator().manual_seed(0)
    shape = (args.seq, args.batch, args.vocab)
    dtype = getattr(torch, args.dtype)
    logits = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    ref_logits = (2 * torch.randn(shape, generator=g)).to(device, dtype)
    labels = torch.randint(0, args.vocab, shape[:-1], generator=g).to(device)

    candidates = {"megatron cross-entropy": megatron_cross_entropy,
                  "plain formula (authors')": plain_formula,
                  "megatron_gift": gift}
    times = {name: [] for name in candidates}
    for repeat in range(args.repeats + 1):
        for name, fn in candidates.items():
            elapsed = step(fn, logits, ref_logits, labels, args.beta, device)
            if repeat:  # the first round warms up allocators and kernels
                times[name].append(elapsed)
    saved = {name: saved_bytes(fn, logits, ref_logits, labels, args.beta)
             for name, fn in candidates.items()}

    print(f"fwd+bwd at s={args.seq} b={args.batch} V={args.vocab} {args.dtype} beta={args.beta} "
          f"on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'loss':26s} {'time ms':>9s} {'saved MiB':>10s}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in candidates:
        print(f"{name:26s} {1e3 * median[name]:9.1f} {saved[name] / 2**20:10.1f}")
    ce, plain, ours = (median[name] for name in candidates)
    ratios = {"time vs cross-entropy": ours / ce, "time vs plain formula": ours / plain,
              "saved vs cross-entropy": saved["megatron_gift"] / saved["megatron cross-entropy"]}
    for name, value in ratios.items():
        verdict = "ok" if value <= TARGETS[name] else "MISSED"
        print(f"{name:24s} {value:5.2f}x  (target <= {TARGETS[name]}x: {verdict})")
    if device.type != "cpu":
        print(f"peak accelerator memory {torch.accelerator.max_memory_allocated() / 2**20:.0f} MiB")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
