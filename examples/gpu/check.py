"""One GPU check of the fused loss, its speed, GIFT's training step, and (where Transformer
Engine is installed) the TE layers and FP8: one summary table, exit status 1 when a check fails.

    bash examples/gpu/check.sh [--out DIR]          # one H100/H200, a few minutes
    python examples/gpu/check.py --quick --device cpu   # the same rows, tiny, on CPU (plumbing)

Rows:
  loss oracle      every loss implementation that runs here (fused Triton, eager), fp32 and bf16,
                   against the float64 full-vocab oracle (megatron_gift/loss/reference.py), V up to 152064, a
                   padded vocab, labels in the reference's far tail
  loss speed       forward+backward against Megatron-Core's cross-entropy, side by side
                   (examples/benchmarks/loss.py): tokens 8192, V = 152064, 19008 (152064 / TP 8),
                   32000; the fused loss must stay within 1.3x of the cross-entropy
  fused head       the fused GIFT head (no logits) against the logits head and Megatron's
                   cross-entropy, bf16, T = 8192, H = 2048, V = 152064 (examples/benchmarks/
                   head.py): loss and gradients against the logits head's, memory below the
                   cross-entropy's, time within 1.05x the logits head's
  training step    a ~1B model (16 layers, hidden 2048, vocab 128256, seq 2048), SFT vs GIFT, bf16
                   (examples/benchmarks/step.py): step-time ratio and peak memory; the same in FP8
                   (student FP8, reference bf16 and FP8) where TE is installed, and GIFT
                   with the fused head
  reference tail   how much a bf16 reference moves GIFT's target (beta 20) against an fp32 one,
                   on the default job's base model (trained here, run by transformers)
  resume           the distributed optimizer with --overlap-param-gather: a run saved at
                   iteration 2 and resumed gives the uninterrupted run's losses at 3 and 4
                   (CUDA only; at DP=1 it shows the save path runs, the staleness it prevents
                   needs DP >= 2)
  TE spec, FP8     rows that need Transformer Engine say so where it is missing

A row is "ok", "FAILED" (the exit status is then 1) or "not run" with the reason.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "examples", "benchmarks")]


@dataclass
class Row:
    check: str
    status: str  # "ok", "FAILED" or "not run"
    detail: str
    seconds: float = 0.0


def loss_oracle_rows(device: torch.device, quick: bool) -> list[Row]:
    """The loss against the float64 oracle, per implementation and dtype."""
    from loss import implementations

    rows = []
    for implementation in implementations(device):
        for dtype in (torch.float32, torch.bfloat16):
            worst = _oracle_errors(implementation, dtype, device, quick)
            # bf16 gradients up to 1.5 carry bf16 rounding: one ulp in [1, 2) is 2^-7.
            loss_tol, grad_tol = 1e-4, (1e-5 if dtype == torch.float32 else 1e-2)
            ok = worst["loss"] <= loss_tol and worst["grad"] <= grad_tol
            rows.append(Row(f"loss oracle, {implementation}, {_name(dtype)}",
                            "ok" if ok else "FAILED",
                            f"max |err| loss {worst['loss']:.1e} (tol {loss_tol:.0e}), grad "
                            f"{worst['grad']:.1e} (tol {grad_tol:.0e}), over {worst['cases']} cases"))
    return rows


def _oracle_errors(implementation, dtype, device, quick):
    from megatron_gift.loss.reference import gift_loss_full_vocab

    from megatron_gift.loss import vocab_parallel_gift_loss

    shapes = [((16, 2), 1000, 1000), ((4, 2), 1024, 1000)]  # (tokens, V, real vocab)
    if not quick:
        shapes += [((64, 2), 32000, 32000), ((4, 2), 152064, 152064)]
    worst = {"loss": 0.0, "grad": 0.0, "cases": 0}
    for seed, (shape, vocab, real) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
        ref = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
        labels = torch.randint(0, real, shape, generator=g)
        labels.view(-1)[::5] = -100
        # Half the labels deep in the reference's tail: p_ref(y) from e^-5 down to e^-60.
        tail = labels.view(-1)[1::2].clamp(min=0)
        depth = torch.linspace(5, 60, tail.numel())
        ref.view(-1, vocab)[1::2][torch.arange(tail.numel()), tail] = (
            ref.view(-1, vocab)[1::2].amax(-1).float() - depth).to(dtype)
        for beta in (0.0, 20.0, 1e4, math.inf):
            for smooth_lambda in (0.0, 0.01):
                x = logits.to(device, copy=True).requires_grad_()
                loss = vocab_parallel_gift_loss(x, ref.to(device), labels.to(device), beta=beta,
                                                smooth_lambda=smooth_lambda, vocab_size=real,
                                                implementation=implementation)
                weights = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
                loss.backward(weights.to(device))
                full = logits[..., :real].double().requires_grad_()
                want = gift_loss_full_vocab(full, ref[..., :real], labels, beta, smooth_lambda)
                want.backward(weights.double())
                grad = x.grad.cpu().double()
                worst["loss"] = max(worst["loss"], float((loss.cpu().double() - want).abs().max()))
                worst["grad"] = max(worst["grad"], float((grad[..., :real] - full.grad).abs().max()),
                                    float(grad[..., real:].abs().max()) if vocab > real else 0.0)
                worst["cases"] += 1
    return worst


def loss_speed_rows(device: torch.device, quick: bool) -> list[Row]:
    """Fused (and eager) GIFT loss against Megatron's cross-entropy, one shape per row."""
    from loss import TIME_TARGETS, measure, print_result, world_of_one

    world_of_one(device)
    seq, vocabs = (256, [4096]) if quick else (8192, [152064, 19008, 32000])
    rows = []
    for vocab in vocabs:
        result = measure(seq, 1, vocab, torch.bfloat16, device, repeats=3 if quick else 10,
                         plain=vocab != 152064)
        print_result(result)
        times = {name.split()[-1]: row["ms"] for name, row in result["rows"].items()}
        ce = times["cross-entropy"]
        for implementation in ("triton", "eager"):
            if implementation not in times:
                continue
            ratio = times[implementation] / ce
            # The target is the fused kernels' on a GPU (the interpreter on CPU is no measure).
            target = (TIME_TARGETS[implementation]
                      if implementation == "triton" and device.type == "cuda" else None)
            status = "ok" if target is None or ratio <= target else "FAILED"
            rows.append(Row(f"loss speed, {implementation}, V={vocab}", status,
                            f"{times[implementation]:.2f} ms vs cross-entropy {ce:.2f} ms: "
                            f"{ratio:.2f}x" + (f" (target <= {target}x)" if target else "")
                            + f"; saved {_saved(result, implementation):.2f}x the CE's"))
    return rows


def fused_head_rows(device: torch.device, quick: bool) -> list[Row]:
    """The fused head (no logits) against the logits head and Megatron's cross-entropy on
    materialised logits, bf16, one ~1B model's head: T = 8192, H = 2048, V = 152064
    (examples/benchmarks/head.py)."""
    from argparse import Namespace

    from head import make_inputs, measure
    from loss import world_of_one

    world_of_one(device)
    tokens, hidden, vocab = (256, 64, 4096) if quick else (8192, 2048, 152064)
    args = Namespace(tokens=tokens, hidden=hidden, beta=20.0, dtype="bfloat16",
                     chunk_tokens=None, repeats=3 if quick else 10)
    exact = _fused_against_logits(make_inputs(tokens, hidden, vocab, torch.bfloat16, device))
    loss_ok = exact["loss"] <= 5e-3 and max(exact["grad_h"], exact["grad_w"]) <= 2e-2
    rows = [Row(f"fused head, exact, V={vocab}", "ok" if loss_ok else "FAILED",
                f"vs the logits head (bf16 logits): loss rel {exact['loss']:.1e} (<= 5e-3), "
                f"gradients rel {exact['grad_h']:.1e} / {exact['grad_w']:.1e} (<= 2e-2)")]
    result = {name: measure(name, args, vocab, device)
              for name in ("fused", "gift logits", "ce logits")}
    fused, logits, ce = result["fused"], result["gift logits"], result["ce logits"]
    time_ratio = fused["ms"] / logits["ms"]
    memory_ratio = fused["peak_mib"] / max(ce["peak_mib"], 1e-9)  # CPU: RSS may not rise
    gpu = device.type == "cuda"
    rows.append(Row(f"fused head, memory, V={vocab}",
                    "ok" if memory_ratio < 1 or not gpu else "FAILED",
                    f"{fused['peak_mib']:.0f} MiB vs Megatron CE {ce['peak_mib']:.0f} MiB, GIFT "
                    f"logits {logits['peak_mib']:.0f} MiB: {memory_ratio:.2f}x CE's (< 1)"))
    rows.append(Row(f"fused head, time, V={vocab}",
                    "ok" if time_ratio <= 1.05 or not gpu else "FAILED",
                    f"{fused['ms']:.1f} ms vs logits head {logits['ms']:.1f} ms: "
                    f"{time_ratio:.2f}x (<= 1.05); Megatron CE {ce['ms']:.1f} ms"))
    return rows


def _fused_against_logits(x: dict) -> dict:
    """Relative differences of the fused head's loss sum and (norm-wise) gradients from the
    logits head's on the same inputs."""
    from head import path_fn

    out = {}
    for name in ("fused", "gift logits"):
        loss = path_fn(name, 20.0, None)(x).float().sum()
        loss.backward()
        out[name] = (loss.detach(), x["h"].grad.float(), x["w"].grad.float())
        x["h"].grad = x["w"].grad = None
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))
    (lf, hf, wf), (ll, hl, wl) = out["fused"], out["gift logits"]
    return {"loss": rel(lf, ll), "grad_h": rel(hf, hl), "grad_w": rel(wf, wl)}


def _saved(result, implementation):
    return result["ratios"][f"{implementation} saved vs cross-entropy"][0]


def step_rows(device: torch.device, quick: bool, te: bool, out: str,
              skip_eager: bool = False) -> list[Row]:
    """SFT vs GIFT training steps of one model, bf16 and (with TE) FP8."""
    # Llama-3.2-1B's shape: 16 layers, hidden 2048, vocab 128256.
    size = (["--layers", "2", "--hidden", "128", "--heads", "4", "--seq", "128",
             "--vocab-size", "4096"] if quick else
            ["--layers", "16", "--hidden", "2048", "--heads", "16", "--seq", "2048",
             "--vocab-size", "128256"])
    variants = [("bf16" if device.type == "cuda" else "fp32", "", "")]
    if device.type == "cuda" and not skip_eager:
        variants.append(("bf16, eager GIFT loss", "", "--gift-loss-implementation eager"))
    variants.append(("bf16, fused head" if device.type == "cuda" else "fp32, fused head", "",
                     "--gift-head fused"))
    fp8 = "--fp8-format hybrid --fp8-recipe delayed"
    variants += [("FP8 student, bf16 reference", fp8, "--reference-precision bf16"),
                 ("FP8 student, FP8 reference", fp8, "--reference-precision fp8")]
    rows = []
    for name, extra, gift in variants:
        if "FP8" in name and not te:
            rows.append(Row(f"training step, {name}", "not run",
                            "Transformer Engine is not installed"))
            continue
        summary = os.path.join(out, f"step-{len(rows)}.json")
        argv = [sys.executable, os.path.join(ROOT, "examples", "benchmarks", "step.py"), *size,
                "--micro-batch", "2", "--iters", "3" if quick else "8", "--rounds", "1",
                *(["--bf16"] if device.type == "cuda" else []), "--extra-flags", extra, "--gift-flags", gift, "--json", summary]
        result = subprocess.run(argv, capture_output=True, text=True, env=_own_world())
        print(result.stdout[-2000:], result.stderr[-4000:] if result.returncode else "")
        if result.returncode:
            rows.append(Row(f"training step, {name}", "FAILED",
                            f"exit {result.returncode}: {result.stderr.strip()[-300:]}"))
            continue
        with open(summary) as f:
            s = json.load(f)
        rows.append(Row(f"training step, {name}", "ok",
                        f"SFT {s['sft_step_s']:.3f} s, GIFT {s['gift_step_s']:.3f} s: "
                        f"{s['time_ratio']:.2f}x; peak {s['sft_peak_mib']:.0f} vs "
                        f"{s['gift_peak_mib']:.0f} MiB: {s['memory_ratio']:.2f}x"))
    return rows


def reference_tail_rows(device: torch.device, quick: bool, out: str) -> list[Row]:
    """How much a bf16 reference moves GIFT's target against an fp32 one, on a trained model:
    the default job's base (stage 1, trained here), exported to Hugging Face, run by
    ``transformers`` in both dtypes over the validation samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gift.demo import default_run
    from megatron_gift.loss.reference_tail import reference_tail_shift

    run_dir = os.path.join(out, "tail-run")
    default_run.prepare(run_dir, base_iters=10 if quick else None)
    hf_dir = os.path.join(run_dir, "hf")
    subprocess.run([sys.executable, "-m", "megatron_gift.convert", "megatron-to-hf", "--load",
                    os.path.join(run_dir, "base"), "--out", hf_dir], check=True, env=_own_world())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with open(default_run.data_paths(run_dir)["valid.jsonl"]) as f:
        texts = [f"{r['prompt']} {r['response']}" for r in map(json.loads, f)]
    batch = tokenizer(texts[:64 if quick else 256], return_tensors="pt", padding=True).to(device)
    labels = torch.where(batch["attention_mask"][:, 1:] > 0, batch["input_ids"][:, 1:], -100)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        with torch.no_grad():
            logits[dtype] = model(**batch).logits[:, :-1].float()
    shift = reference_tail_shift(logits[torch.float32], logits[torch.bfloat16], labels, 20.0)
    with open(os.path.join(out, "reference-tail.json"), "w") as f:
        json.dump(shift.as_dict(), f, indent=1)
    return [Row("reference tail, bf16 vs fp32 (default job's base, beta 20)", "ok",
                f"{shift.tokens} tokens: q(y) < 0.5 on {100 * shift.share_q_below_half_a:.2f}% "
                f"(fp32) vs {100 * shift.share_q_below_half_b:.2f}% (bf16), differing on "
                f"{100 * shift.share_q_below_half_disagree:.2f}%; |d log p(y)| mean "
                f"{shift.mean_abs_dlogp:.3f}, max {shift.max_abs_dlogp:.3f} nats; KL(q_fp32 || "
                f"q_bf16) mean {shift.mean_kl:.2e}, max {shift.max_kl:.2e}")]


RESUME = "resume, distributed optimizer + overlapped gather (saved at 2, losses 3-4)"


def resume_rows(device: torch.device, quick: bool, out: str) -> list[Row]:
    """Train 4 iterations of the default job's GIFT stage with the distributed optimizer and
    the overlapped parameter gather, saving at 2 and 4; resume a branch from iteration 2; the
    branch's losses at 3 and 4 must be the uninterrupted run's (rel 1e-3: bf16 kernels with
    atomics are not bit-reproducible)."""
    if device.type != "cuda":
        return [Row(RESUME, "not run", "the distributed optimizer needs CUDA")]
    from megatron_gift.demo import default_run

    run_dir = os.path.join(out, "resume-run")
    default_run.prepare(run_dir, base_iters=10 if quick else 100)
    common = ["--pretrained-checkpoint", os.path.join(run_dir, "base"), "--train-path",
              default_run.data_paths(run_dir)["demonstrations.jsonl"], "--train-iters", "4",
              "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3",
              "--save-interval", "2", "--bf16", "--use-distributed-optimizer",
              "--overlap-param-gather", "--no-progress"]
    whole, branch = os.path.join(run_dir, "whole"), os.path.join(run_dir, "branch")
    for argv in (["--save", whole], ["--load", os.path.join(whole, "iter_0000002"),
                                     "--save", branch]):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_gift.py"),
                        *common, *argv], check=True, env=_own_world())
    losses = {}
    for name, directory in (("whole", whole), ("branch", branch)):
        with open(os.path.join(directory, "metrics.jsonl")) as f:
            losses[name] = {r["iteration"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    pairs = [(losses["whole"][i], losses["branch"].get(i, math.nan)) for i in (3, 4)]
    worst = max(abs(b - a) / abs(a) for a, b in pairs)
    detail = ", ".join(f"{a:.5f} vs {b:.5f}" for a, b in pairs) + f": rel {worst:.1e}"
    ok = not any(math.isnan(b) for _, b in pairs) and worst <= 1e-3
    return [Row(RESUME, "ok" if ok else "FAILED", detail)]


def _own_world() -> dict:
    """This environment without a launcher's rendezvous: a subprocess makes its own."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def te_rows(te: bool) -> list[Row]:
    """Rows that need Transformer Engine: the TE layer spec against the local one, and how much
    an FP8 reference moves the tail of p_ref."""
    names = ("TE spec vs local spec (HF logits, 5 GIFT iterations)",
             "FP8 reference tail report (bf16 vs FP8)")
    why = ("Transformer Engine is not installed" if not te else
           "not automated in this script yet: see docs/gpu-check.md")
    return [Row(name, "not run", why) for name in names]


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _timed(rows_fn, *args) -> list[Row]:
    start = time.perf_counter()
    try:
        rows = rows_fn(*args)
    except Exception:  # one broken group of rows must not hide the others
        traceback.print_exc()
        rows = [Row(rows_fn.__name__.removesuffix("_rows").replace("_", " "), "FAILED",
                    traceback.format_exc(limit=1).strip().splitlines()[-1][:300])]
    for row in rows:
        row.seconds = (time.perf_counter() - start) / len(rows)
    return rows


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}")
    width = max(len(row.check) for row in rows)
    print(f"{'check':{width}s}  {'status':7s}  detail")
    for row in rows:
        print(f"{row.check:{width}s}  {row.status:7s}  {row.detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the JSON summary")
    parser.add_argument("--device", default=None, help="default: the accelerator")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the rows)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["oracle", "speed", "head", "step", "eager-step", "tail", "resume"])
    args = parser.parse_args()
    from loss import default_device

    device = default_device(args.device)
    if device.type == "cpu" and not args.device:
        print("no GPU here (torch.accelerator.is_available() is False); --device cpu --quick runs "
              "the rows on CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    from megatron_gift.platform import te as transformer_engine

    te = transformer_engine.available()
    started = time.perf_counter()
    rows = []
    if "oracle" not in args.skip:
        rows += _timed(loss_oracle_rows, device, args.quick)
    if "speed" not in args.skip:
        rows += _timed(loss_speed_rows, device, args.quick)
    if "head" not in args.skip:
        rows += _timed(fused_head_rows, device, args.quick)
    if "step" not in args.skip:
        rows += _timed(step_rows, device, args.quick, te, args.out, "eager-step" in args.skip)
    if "tail" not in args.skip:
        rows += _timed(reference_tail_rows, device, args.quick, args.out)
    if "resume" not in args.skip:
        rows += _timed(resume_rows, device, args.quick, args.out)
    rows += te_rows(te)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"{time.strftime('%Y-%m-%d')} on {gpu}: torch {torch.__version__}, Transformer "
              f"Engine {'installed' if te else 'missing'}, {time.perf_counter() - started:.0f} s")
    print_table(rows, header)
    with open(os.path.join(args.out, "check.json"), "w") as f:
        json.dump({"header": header, "rows": [asdict(row) for row in rows]}, f, indent=1)
    return 1 if any(row.status == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
