"""``python -m megatron_gift.evaluate``: sample from a checkpoint and score it.

::

    python -m megatron_gift.evaluate --load CKPT --data FILE [--samples 16] [--out RESULT.json]
        [--reference BASE_CKPT] [--beta 5 20 inf] [--checker answer|math] [--temperature 1]

``CKPT`` is any checkpoint the trainer writes (exported on the fly with the project's HF
export) or a Hugging Face model directory. ``FILE`` is JSONL or parquet with a prompt field
and a reference-answer field (``--prompt-field``, ``--answer-field``; default ``prompt`` and
``answer``, as the embedded world's demonstration files have). Each prompt gets ``--samples``
completions at ``--temperature`` (default 1; 0 is greedy decoding, every sample the argmax
one); a completion is correct when the answer it states equals the reference: the text after
its last ``A:`` (``--checker answer``, the embedded world) or ``math_verify`` equivalence
(``--checker math``). Printed and written: pass@k for k = 1 .. samples (the unbiased
estimator), mean per-token entropy (of the distribution sampled from) and length of the
samples, the solution styles when the prompts are the embedded arithmetic world's and, with
``--reference``, the KL of the sampled policy to the reference (a Monte-Carlo estimate over the
samples, nats per sequence). With ``--reference`` and a response field in the data, also
GIFT's target per demonstrated token for each ``--beta``: the share of tokens where
``q(y*) < 0.5`` and where they sit.
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from typing import Iterator, NoReturn, Optional, Sequence

from megatron_gift.errors import ConfigError, MissingFileError, UserError
from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party

DEFAULT_BETAS = (2.0, 5.0, 10.0, 20.0, 50.0)
# A prompt of the embedded arithmetic world (megatron_gift.data.synthetic, .chains).
_ARITHMETIC_PROMPT = re.compile(r"Q: [0-9()+\-* ]+ = \?")


def read_records(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                 response_field: Optional[str] = "response", limit: Optional[int] = None) -> list[dict]:
    """``[{"prompt", "answer"[, "response"]}]`` from a JSONL or parquet file (the first
    ``limit`` records when given). Raises UserError naming the file, the line or record and the
    flag for a record that lacks a field."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--data {path}: no such file")
    records = []
    for where, row in itertools.islice(_rows(path), limit):
        for flag, field in (("--prompt-field", prompt_field), ("--answer-field", answer_field)):
            if field not in row:
                has = ", ".join(map(repr, row)) or "none"
                raise UserError(f"--data {path}, {where}: no field {field!r} (name the field "
                                f"with {flag}; the record has {has})")
        record = {"prompt": row[prompt_field], "answer": str(row[answer_field])}
        if response_field and response_field in row:
            record["response"] = row[response_field]
        records.append(record)
    if not records:
        raise UserError(f"--data {path}: no records")
    return records


def _rows(path: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each record: ``line N`` of a JSONL file, ``record N`` of parquet."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"record {i}", row
        return
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"--data {path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"--data {path}, line {number}: not a JSON object")
            yield f"line {number}", row


def is_arithmetic_world(records: Sequence[dict]) -> bool:
    """Whether every prompt is one of the embedded arithmetic world's, the only data whose
    solution styles (:func:`megatron_gift.data.chains.classify_style`) mean something."""
    return all(isinstance(r["prompt"], str) and _ARITHMETIC_PROMPT.fullmatch(r["prompt"])
               for r in records)


def checker_for(name: str):
    """``check(completion_text, answer) -> bool``."""
    if name == "answer":
        from megatron_gift.data.synthetic import answer_of

        return lambda text, answer: answer_of(text) == answer.replace(" ", "")
    from math_verify import parse, verify

    return lambda text, answer: bool(verify(parse(answer), parse(text)))


def evaluate_policy(model, tokenizer, records: Sequence[dict], samples: int = 16,
                    max_new_tokens: int = 48, checker: str = "answer", seed: int = 0,
                    reference=None, batch_size: int = 512, temperature: float = 1.0) -> dict:
    """Sample ``samples`` completions per record at ``temperature`` and score them (see the
    module doc); ``styles`` only for the embedded arithmetic world's prompts."""
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
        out = sample(model, tokenizer, [ids for _, ids in chunk], max_new_tokens, generator,
                     temperature)
        texts += out.texts
        correct += [check(t, records[i]["answer"]) for (i, _), t in zip(chunk, out.texts)]
        entropy += [sum(e) / max(len(e), 1) for e in out.entropies]
        lengths += [len(t) for t in out.tokens]
        if reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(reference, [ids for _, ids in chunk], out.tokens, pad)
            kl += [sum(lp) - float(r.sum()) for lp, r in zip(out.logprobs, ref)]
    per_prompt = [correct[i * samples:(i + 1) * samples] for i in range(len(records))]
    counts = [sum(c) for c in per_prompt]
    result = {
        "prompts": len(records), "samples": samples, "temperature": temperature,
        "pass@1": pass_at_k_curve(counts, samples, [1])["1"],
        "pass@k": pass_at_k_curve(counts, samples, range(1, samples + 1)),
        "entropy": sum(entropy) / len(entropy),
        "length": sum(lengths) / len(lengths),
        "examples": [{"prompt": records[i]["prompt"], "completion": texts[i * samples],
                      "correct": per_prompt[i][0]} for i in range(min(3, len(records)))],
    }
    if is_arithmetic_world(records):
        styles = [[classify_style(t) for t in texts[i * samples:(i + 1) * samples]]
                  for i in range(len(records))]
        result["styles"] = style_diversity(styles, per_prompt)
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


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as a user error: one ``error:`` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m megatron_gift.evaluate", description=plain_text(__doc__),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint root, iter_* dir or HF dir")
    parser.add_argument("--data", required=True, help="JSONL or parquet of prompts and answers")
    parser.add_argument("--samples", type=int, default=16, help="completions per prompt (n)")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature; 0 is greedy decoding (default %(default)s)")
    parser.add_argument("--checker", default="answer", choices=("answer", "math"),
                        help="answer: text after the last 'A:'; math: math_verify equivalence")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--response-field", default="response",
                        help="demonstrations, for the GIFT per-token diagnostics")
    parser.add_argument("--reference", help="base checkpoint: KL to it and GIFT diagnostics")
    parser.add_argument("--beta", type=float, nargs="*",
                        help="betas of the GIFT diagnostics (needs --reference; default "
                             f"{' '.join(f'{b:g}' for b in DEFAULT_BETAS)})")
    parser.add_argument("--smooth-lambda", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512, help="sequences sampled at once")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse, as a user error naming the flag, what the parser lets through."""
    for flag in ("--samples", "--limit", "--max-new-tokens", "--batch-size", "--threads"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.temperature < math.inf:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy decoding), got "
                          f"{args.temperature:g}")
    if args.beta is not None and not args.reference:
        raise ConfigError("--beta needs --reference (the GIFT diagnostics score the "
                          "demonstrations under the reference model)")
    for flag, path in (("--load", args.load), ("--reference", args.reference)):
        if path and not os.path.exists(path):
            raise MissingFileError(f"{flag} {path}: no such file or directory")


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
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
                                args.checker, args.seed, reference, args.batch_size,
                                args.temperature)}
    if reference is not None and all("response" in r for r in records):
        betas = DEFAULT_BETAS if args.beta is None else args.beta
        result["gift_tokens"] = gift_token_diagnostics(reference, tokenizer, records, betas,
                                                       args.smooth_lambda)
    result["seconds"] = time.time() - started
    _print_summary(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    sys.stdout.flush()


def _print_summary(result: dict) -> None:
    samples, temperature = result["samples"], result["temperature"]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    at = "" if temperature == 1 else f" at temperature {temperature:g}" + (
        " (greedy)" if temperature == 0 else "")
    print(f"{result['prompts']} prompts x {samples} samples{at}: "
          + ", ".join(f"pass@{k} {result['pass@k'][str(k)]:.3f}" for k in ks))
    line = f"entropy {result['entropy']:.3f} nats/token, length {result['length']:.1f} tokens"
    if "styles" in result:
        shares = {k: round(v, 3) for k, v in result["styles"]["shares"].items()}
        line += f", styles {json.dumps(shares)}"
    print(line)
    if "kl_to_reference" in result:
        print(f"KL to reference {result['kl_to_reference']:.3f} nats/sequence")
    for beta, d in result.get("gift_tokens", {}).get("beta", {}).items():
        print(f"GIFT beta {beta}: q(y*) < 0.5 on {d['share_q_below_half']:.2%} of demonstrated "
              f"tokens, mean q(y*) {d['mean_q']:.3f}")


if __name__ == "__main__":
    main()
