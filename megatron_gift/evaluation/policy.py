"""A policy sampled and scored: pass@k, entropy, solution styles, KL to a reference, and GIFT's
target per demonstrated token (what ``megatron-gift evaluate`` prints); the records it reads.

Answers are checked by the text after the last ``A:`` or by ``math_verify`` equivalence.
Solution styles are a plug-in: a ``style_of(completion) -> style`` the caller passes where its
prompts have styles (the embedded arithmetic world's: :mod:`megatron_gift.demo.chains`).
"""

import itertools
import math
import os
from collections import Counter
from typing import Callable, Optional, Sequence, Union

from megatron_gift.errors import MissingFileError, UserError

DEFAULT_BETAS = (2.0, 5.0, 10.0, 20.0, 50.0)
StyleOf = Callable[[str], str]  # a completion -> its solution style
Check = Callable[[str, dict], bool]  # (completion, record) -> correct


def read_records(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                 response_field: Optional[str] = "response", limit: Optional[int] = None) -> list[dict]:
    """``[{"prompt", "answer"[, "response"]}]`` from a JSONL or Parquet file or a ``datasets``
    directory, read as the training data is (:func:`megatron_gift.data.records.rows`; the first
    ``limit`` records when given). Raises UserError naming the file, the line or row and the
    flag for a record that is not one or lacks a field."""
    from megatron_gift.data.records import Malformed, rows

    if not os.path.exists(path):
        raise MissingFileError(f"--data {path}: no such file")
    records = []
    for place, row in itertools.islice(rows(path), limit):
        if isinstance(row, Malformed):
            raise UserError(f"--data {place}: {row}")
        if not isinstance(row, dict):
            raise UserError(f"--data {place}: not a JSON object")
        for flag, field in (("--prompt-field", prompt_field), ("--answer-field", answer_field)):
            if field not in row:
                has = ", ".join(map(repr, row)) or "none"
                raise UserError(f"--data {place}: no field {field!r} (name the field with "
                                f"{flag}; the record has {has})")
        record = {"prompt": row[prompt_field], "answer": str(row[answer_field])}
        if response_field and response_field in row:
            record["response"] = row[response_field]
        records.append(record)
    if not records:
        raise UserError(f"--data {path}: no records")
    return records


def stated_answer(text: str) -> Optional[str]:
    """The answer a completion states: the text after its last ``A:`` (spaces removed), or
    None."""
    tail = text.rsplit("A:", 1)
    return tail[1].strip().replace(" ", "") if len(tail) == 2 else None


def checker_for(name: str):
    """``check(completion_text, answer) -> bool``."""
    if name == "answer":
        return lambda text, answer: stated_answer(text) == answer.replace(" ", "")
    from math_verify import parse, verify

    return lambda text, answer: bool(verify(parse(answer), parse(text)))


def evaluate_policy(model, tokenizer, records: Sequence[dict], samples: int = 16,
                    max_new_tokens: int = 48, checker: Union[str, Check] = "answer",
                    seed: int = 0, reference=None, batch_size: int = 512,
                    temperature: float = 1.0, style_of: Optional[StyleOf] = None) -> dict:
    """Sample ``samples`` completions per record at ``temperature`` and score them (see the
    module doc; ``checker``: a name of :func:`checker_for` or a ``(completion, record) ->
    bool``); ``styles`` (each prompt's completions by ``style_of``: shares, diversity and the
    accuracy of each style's samples) where it is given."""
    import torch

    from megatron_gift.data.formatting import prompt_ids
    from megatron_gift.evaluation.metrics import pass_at_k_curve, style_diversity
    from megatron_gift.evaluation.sampling import real_vocab_size, sample, sequence_logprobs

    check = _record_check(checker)
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
        correct += [check(t, records[i]) for (i, _), t in zip(chunk, out.texts)]
        entropy += [sum(e) / max(len(e), 1) for e in out.entropies]
        lengths += [len(t) for t in out.tokens]
        if reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(reference, [ids for _, ids in chunk], out.tokens, pad,
                                        real_vocab_size(model, tokenizer))
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
    if style_of is not None:
        styles = [[style_of(t) for t in texts[i * samples:(i + 1) * samples]]
                  for i in range(len(records))]
        result["styles"] = style_diversity(styles, per_prompt)
        result["styles"]["accuracy"] = _style_accuracy(styles, per_prompt)
    if reference is not None:
        result["kl_to_reference"] = sum(kl) / len(kl)
    return result


def _record_check(checker: Union[str, Check]) -> Check:
    if callable(checker):
        return checker
    check = checker_for(checker)
    return lambda text, record: check(text, record["answer"])


def _style_accuracy(styles: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]]
                    ) -> dict[str, float]:
    """Per style, the share of its samples that are correct."""
    hits, counts = Counter(), Counter()
    for prompt_styles, prompt_correct in zip(styles, correct):
        for style, ok in zip(prompt_styles, prompt_correct):
            counts[style] += 1
            hits[style] += bool(ok)
    return {s: hits[s] / counts[s] for s in sorted(counts)}


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
    from megatron_gift.evaluation.sampling import real_vocab_size, sequence_logprobs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id] for r in records]
    with torch.no_grad():
        logps = sequence_logprobs(reference, prompts, responses, pad,
                                  real_vocab_size(reference, tokenizer))
    tokens = []  # (log p_ref, relative position bin, kind)
    for ids, lp in zip(responses, logps):
        kinds = token_kinds(tokenizer.convert_ids_to_tokens(ids))
        for t, (value, kind) in enumerate(zip(lp.tolist(), kinds)):
            tokens.append((value, min(bins - 1, t * bins // len(ids)), kind))
    all_kinds = Counter(kind for _, _, kind in tokens)
    result = {"tokens": len(tokens), "mean_p_ref": sum(math.exp(v) for v, _, _ in tokens) / len(tokens),
              "kinds": dict(all_kinds), "beta": {}}
    vocab = real_vocab_size(reference, tokenizer)
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
