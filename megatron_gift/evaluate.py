"""``python -m megatron_gift.evaluate``: sample from a checkpoint and score it.

::

    python -m megatron_gift.evaluate --load CKPT --data FILE [--samples 16] [--out RESULT.json]
        [--reference BASE_CKPT] [--beta 5 20 inf] [--checker answer|math]

``CKPT`` is any checkpoint the trainer writes (exported on the fly with the project's HF
export) or a Hugging Face model directory. ``FILE`` is JSONL or parquet with a prompt field
and a reference-answer field (``--prompt-field``, ``--answer-field``; default ``prompt`` and
``answer``, as the embedded world's demonstration files have). Each prompt gets ``--samples``
completions at temperature 1; a completion is correct when the answer it states equals the
reference: the text after its last ``A:`` (``--checker answer``, the embedded world) or
``math_verify`` equivalence (``--checker math``). Printed and written: pass@k for k = 1 ..
samples (the unbiased estimator), mean per-token entropy and length of the samples, the
solution styles of the embedded world and, with ``--reference``, the KL of the sampled policy
to the reference (a Monte-Carlo estimate over the samples, nats per sequence). With
``--reference`` and a response field in the data, also GIFT's target per demonstrated token for
each ``--beta``: the share of tokens where ``q(y*) < 0.5`` and where they sit.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point, quiet_third_party


def read_records(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                 response_field: Optional[str] = "response", limit: Optional[int] = None) -> list[dict]:
    """``[{"prompt", "answer"[, "response"]}]`` from a JSONL or parquet file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --data {path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    records = []
    for i, row in enumerate(rows[:limit]):
        missing = [k for k in (prompt_field, answer_field) if k not in row]
        if missing:
            raise SystemExit(f"error: --data {path}: record {i} has no field {missing}")
        record = {"prompt": row[prompt_field], "answer": str(row[answer_field])}
        if response_field and response_field in row:
            record["response"] = row[response_field]
        records.append(record)
    return records


def checker_for(name: str):
    """``check(completion_text, answer) -> bool``."""
    if name == "answer":
        from megatron_gift.data.synthetic import answer_of

        return lambda text, answer: answer_of(text) == answer.replace(" ", "")
    from math_verify import parse, verify

    return lambda text, answer: bool(verify(parse(answer), parse(text)))


def evaluate_policy(model, tokenizer, records: Sequence[dict], samples: int = 16,
                    max_new_tokens: int = 48, checker: str = "answer", seed: int = 0,
                    reference=None, batch_size: int = 512) -> dict:
    """Sample ``samples`` completions per record and score them (see the module doc)."""
    import torch

    from megatron_gift.data.chains import classify_style
    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.metrics import pass_at_k_curve, style_diversity
    from megatron_gift.evaluation.sampling import sample, sequence_logprobs

    check = checker_for(checker)
    generator = torch.Generator().manual_seed(seed)
    encoded = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    flat = [(i, ids) for i, ids in enumerate(encoded) for _ in range(samples)]
    texts, correct, entropy, lengths, kl = [], [], [], [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        out = sample(model, tokenizer, [ids for _, ids in chunk], max_new_tokens, generator)
        texts += out.texts
        correct += [check(t, records[i]["answer"]) for (i, _), t in zip(chunk, out.texts)]
        entropy += [sum(e) / max(len(e), 1) for e in out.entropies]
        lengths += [len(t) for t in out.tokens]
        if reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(reference, [ids for _, ids in chunk], out.tokens, pad)
            kl += [sum(lp) - float(r.sum()) for lp, r in zip(out.logprobs, ref)]
    per_prompt = [correct[i * samples:(i + 1) * samples] for i in range(len(records))]
    styles = [[classify_style(t) for t in texts[i * samples:(i + 1) * samples]]
              for i in range(len(records))]
    counts = [sum(c) for c in per_prompt]
    result = {
        "prompts": len(records), "samples": samples,
        "pass@1": pass_at_k_curve(counts, samples, [1])["1"],
        "pass@k": pass_at_k_curve(counts, samples, range(1, samples + 1)),
        "entropy": sum(entropy) / len(entropy),
        "length": sum(lengths) / len(lengths),
        "styles": style_diversity(styles, per_prompt),
        "examples": [{"prompt": records[i]["prompt"], "completion": texts[i * samples],
                      "correct": per_prompt[i][0]} for i in range(min(3, len(records)))],
    }
    if reference is not None:
        result["kl_to_reference"] = sum(kl) / len(kl)
    return result


def token_kinds(tokens: Sequence[str]) -> list[str]:
    """Each response token's role in an arithmetic solution: ``result`` (a digit of a number
    after ``=`` or ``A:``), ``operand`` (another digit), ``eos`` or ``symbol``."""
    kinds, in_result = [], False
    for token in tokens:
        if token.isdigit() or (token == "-" and in_result == "start"):
            kinds.append("result" if in_result else "operand")
            in_result = in_result and True
            continue
        in_result = "start" if token in ("=", "A:") else False
        kinds.append("eos" if token in ("<eos>", "</s>") else "symbol")
    return kinds


def gift_token_diagnostics(reference, tokenizer, records: Sequence[dict],
                           betas: Sequence[float], smooth_lambda: float = 0.0,
                           bins: int = 5) -> dict:
    """GIFT's target ``q(y*)`` on every demonstrated response token under ``reference``: per
    beta, the share of tokens with ``q(y*) < 0.5`` (where GIFT departs from SFT the most), the
    mean ``q(y*)``, and of the ``q < 0.5`` tokens the share by position in the response
    (``bins`` equal parts) and by kind (:func:`token_kinds`)."""
    import torch

    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.metrics import gift_target_mass
    from megatron_gift.evaluation.sampling import sequence_logprobs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id] for r in records]
    with torch.no_grad():
        logps = sequence_logprobs(reference, prompts, responses, pad)
    tokens = []  # (log p_ref, relative position bin, kind)
    for ids, lp in zip(responses, logps):
        kinds = token_kinds(tokenizer.convert_ids_to_tokens(ids))
        for t, (value, kind) in enumerate(zip(lp.tolist(), kinds)):
            tokens.append((value, min(bins - 1, t * bins // len(ids)), kind))
    all_kinds = Counter(kind for _, _, kind in tokens)
    result = {"tokens": len(tokens), "mean_p_ref": sum(math.exp(v) for v, _, _ in tokens) / len(tokens),
              "kinds": dict(all_kinds), "beta": {}}
    vocab = len(tokenizer)
    for beta in betas:
        q = [gift_target_mass(v, beta, smooth_lambda, vocab) for v, _, _ in tokens]
        low = [(b, kind) for (_, b, kind), qi in zip(tokens, q) if qi < 0.5]
        by_bin, by_kind = Counter(b for b, _ in low), Counter(kind for _, kind in low)
        result["beta"][_beta_key(beta)] = {
            "share_q_below_half": len(low) / len(tokens),
            "mean_q": sum(q) / len(q),
            "low_by_position": [by_bin[b] / max(len(low), 1) for b in range(bins)],
            "low_by_kind": {k: by_kind[k] / max(len(low), 1) for k in sorted(all_kinds)},
            "low_share_of_kind": {k: by_kind[k] / all_kinds[k] for k in sorted(all_kinds)},
        }
    return result


def _beta_key(beta: float) -> str:
    return "inf" if math.isinf(beta) else f"{beta:g}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_gift.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint root, iter_* dir or HF dir")
    parser.add_argument("--data", required=True, help="JSONL or parquet of prompts and answers")
    parser.add_argument("--samples", type=int, default=16, help="completions per prompt (n)")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--checker", default="answer", choices=("answer", "math"),
                        help="answer: text after the last 'A:'; math: math_verify equivalence")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--response-field", default="response",
                        help="demonstrations, for the GIFT per-token diagnostics")
    parser.add_argument("--reference", help="base checkpoint: KL to it and GIFT diagnostics")
    parser.add_argument("--beta", type=float, nargs="*", default=[2, 5, 10, 20, 50],
                        help="betas of the GIFT diagnostics (needs --reference)")
    parser.add_argument("--smooth-lambda", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512, help="sequences sampled at once")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    quiet_third_party()
    import torch

    from megatron_gift.evaluation.sampling import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    started = time.time()
    records = read_records(args.data, args.prompt_field, args.answer_field, args.response_field,
                           args.limit)
    model, tokenizer = load_policy(args.load)
    reference = load_policy(args.reference)[0] if args.reference else None
    result = {"load": args.load, "data": args.data,
              **evaluate_policy(model, tokenizer, records, args.samples, args.max_new_tokens,
                                args.checker, args.seed, reference, args.batch_size)}
    if reference is not None and all("response" in r for r in records):
        result["gift_tokens"] = gift_token_diagnostics(reference, tokenizer, records, args.beta,
                                                       args.smooth_lambda)
    result["seconds"] = time.time() - started
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.samples]
    print(f"{len(records)} prompts x {args.samples} samples: "
          + ", ".join(f"pass@{k} {result['pass@k'][str(k)]:.3f}" for k in ks))
    print(f"entropy {result['entropy']:.3f} nats/token, length {result['length']:.1f} tokens, "
          f"styles {json.dumps({k: round(v, 3) for k, v in result['styles']['shares'].items()})}")
    if "kl_to_reference" in result:
        print(f"KL to reference {result['kl_to_reference']:.3f} nats/sequence")
    for beta, d in result.get("gift_tokens", {}).get("beta", {}).items():
        print(f"GIFT beta {beta}: q(y*) < 0.5 on {d['share_q_below_half']:.2%} of demonstrated "
              f"tokens, mean q(y*) {d['mean_q']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
