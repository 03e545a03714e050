"""Load a checkpoint as a ``transformers`` causal LM, sample from it, and score sequences.

Prompts are token ids encoded as the trainer encodes prompt/response records
(:func:`megatron_gift.data.formatting.prompt_ids`); a completion ends at eos. Sampling is
ancestral over the whole vocabulary (no top-k/top-p) at a temperature (1: the model's
distribution; 0: greedy, the argmax), with the KV cache; batches are left-padded. Sampling and
scoring both normalise over the same columns, :func:`real_vocab_size`: a model whose output
layer is padded beyond the tokenizer (or a tokenizer larger than the model) never puts mass on,
or is scored against, a column no token can name.
"""

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Samples:
    """Completions of a batch: token ids (eos included when it was reached), texts, and per
    token the log-probability and entropy (nats) of the distribution it was drawn from (the
    model's at temperature 1; at temperature 0 a point mass: 0 and 0)."""

    tokens: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]]
    entropies: list[list[float]]


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_policy(path: str, export_dir: Optional[str] = None):
    """``(model, tokenizer)`` from a Hugging Face directory or any Megatron checkpoint this
    project writes (exported with :func:`megatron_gift.hf.convert.megatron_to_hf` into
    ``export_dir``, a temporary directory when None). fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_hf_dir(path):
        from megatron_gift.hf.convert import megatron_to_hf

        export_dir = export_dir or tempfile.mkdtemp(prefix="megatron_gift_export_")
        path = megatron_to_hf(path, export_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def real_vocab_size(model, tokenizer=None) -> Optional[int]:
    """The logit columns a token id can name: the model's vocab (``config.vocab_size``), capped
    by ``len(tokenizer)`` when one is given; columns beyond are padding. None (every column)
    when neither is known."""
    sizes = [getattr(getattr(model, "config", None), "vocab_size", None),
             len(tokenizer) if tokenizer is not None else None]
    sizes = [int(v) for v in sizes if v]
    return min(sizes) if sizes else None


def _left_pad(sequences: Sequence[Sequence[int]], pad: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> Samples:
    """One completion per prompt (token-id lists; repeat a prompt for several samples), drawn
    at ``temperature`` (>= 0; 0 is greedy decoding: every completion of a prompt is its argmax
    one)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    vocab = real_vocab_size(model, tokenizer)
    ids, mask = _left_pad(prompts, pad)
    batch = ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    out_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long)
    out_logp = torch.zeros(batch, max_new_tokens)
    out_ent = torch.zeros(batch, max_new_tokens)
    lengths = torch.zeros(batch, dtype=torch.long)
    current, past = ids, None
    for t in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -current.shape[1]:]
        out = model(input_ids=current, attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        token, logp = _draw(out.logits[:, -1, :vocab].float(), temperature, generator)
        live = ~done
        token = torch.where(live, token, torch.full_like(token, pad))
        out_tokens[:, t] = token
        out_logp[:, t] = torch.where(live, logp.gather(1, token[:, None]).squeeze(1), 0.0)
        out_ent[:, t] = torch.where(live, torch.special.entr(logp.exp()).sum(-1), 0.0)
        lengths += live.long()
        done |= token == eos
        if done.all():
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        current = token[:, None]
    tokens = [out_tokens[i, :lengths[i]].tolist() for i in range(batch)]
    texts = [tokenizer.decode([x for x in seq if x != eos], skip_special_tokens=True)
             for seq in tokens]
    return Samples(tokens, texts, [out_logp[i, :lengths[i]].tolist() for i in range(batch)],
                   [out_ent[i, :lengths[i]].tolist() for i in range(batch)])


def _draw(logits: torch.Tensor, temperature: float,
          generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B], log-probabilities [B, V] of the distribution they were drawn from)``."""
    if temperature == 0:
        token = logits.argmax(-1)
        logp = torch.full_like(logits, -math.inf).scatter_(1, token[:, None], 0.0)
        return token, logp
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1), logp


def sequence_logprobs(model, prompts: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[int]], pad: int,
                      vocab: Optional[int] = None) -> list[torch.Tensor]:
    """Per-token log-probabilities the model gives each completion after its prompt (a list of
    1-D tensors; differentiable when grad is enabled), normalised over the first ``vocab``
    columns (default :func:`real_vocab_size` of the model; pass the tokenizer's as
    :func:`sample` does)."""
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, mask = _left_pad(sequences, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    vocab = real_vocab_size(model) if vocab is None else vocab  # None: every column
    logp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    width = ids.shape[1]
    result = []
    for i, c in enumerate(completions):
        n = len(c)
        if n == 0:
            result.append(logp.new_zeros(0))
            continue
        rows = logp[i, width - n - 1: width - 1]
        result.append(rows.gather(1, ids[i, width - n:, None]).squeeze(1))
    return result
