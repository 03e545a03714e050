"""``megatron-gift evaluate``: sample from a checkpoint and score it.

::

    megatron-gift evaluate --load CKPT --data FILE [--samples 16] [--out RESULT.json]
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
import json
import math
import os
import random
import sys
import time
from typing import NoReturn, Optional, Sequence

from megatron_gift.errors import ConfigError, MissingFileError
from megatron_gift.evaluation.policy import DEFAULT_BETAS  # plain Python: --help stays fast
from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as a user error: one ``error:`` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-gift evaluate", description=plain_text(__doc__),
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

    from megatron_gift.evaluation.policy import (evaluate_policy, gift_token_diagnostics,
                                                 read_records)
    from megatron_gift.demo.chains import style_classifier
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
                                args.temperature, style_classifier(records))}
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
