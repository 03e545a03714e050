"""GRPO in plain PyTorch on a ``transformers`` causal LM: the study's RL stage.

Each step draws ``prompts`` records from a prompt stream (half regular, half audit prompts of
the audit-chains world, :mod:`megatron_gift.demo.audit`), samples ``group`` completions of each
at temperature 1, rewards a completion 1 when it meets the RL objective (the right final
answer; on audit prompts also the first equation stated) and takes one Adam step on
``-sum_t A_i log pi(y_it)`` averaged over the step's completion tokens, with the group-relative
advantage ``A_i = (r_i - mean_group) / (std_group + 1e-4)``. One update per batch of samples
(fully on-policy, so PPO's ratio is 1 and its clip inactive), no KL term (as the paper's RL).
"""

from dataclasses import dataclass

import torch

from megatron_gift.data.formatting import prompt_ids
from megatron_gift.demo.audit import PromptStream, is_correct
from megatron_gift.evaluation.sampling import real_vocab_size, sample, sequence_logprobs


@dataclass
class GRPOSettings:
    steps: int = 40
    prompts: int = 16
    group: int = 8
    lr: float = 1e-4
    max_new_tokens: int = 24
    clip_grad: float = 1.0


def grpo(model, tokenizer, settings: GRPOSettings, seed: int, exclude: set[str] = frozenset(),
         log=None) -> list[dict]:
    """Train ``model`` in place on the prompt stream of ``seed`` (the same for every arm;
    ``exclude``: held-out expressions); returns one record per step: mean reward overall and
    on regular (``reward_s0``) and audit (``reward_s1``) prompts, loss, tokens."""
    stream = PromptStream(10_000 + seed, exclude)
    generator = torch.Generator().manual_seed(20_000 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.99))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = real_vocab_size(model, tokenizer)
    curve = []
    for step in range(settings.steps):
        records = [r for r in stream.draw(settings.prompts) for _ in range(settings.group)]
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records]
        model.eval()
        out = sample(model, tokenizer, prompts, settings.max_new_tokens, generator)
        rewards = torch.tensor([float(is_correct(t, r)) for t, r in zip(out.texts, records)])
        grouped = rewards.view(settings.prompts, settings.group)
        advantages = ((grouped - grouped.mean(1, keepdim=True))
                      / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        model.train()
        logps = sequence_logprobs(model, prompts, out.tokens, pad, vocab)
        tokens = sum(len(t) for t in out.tokens)
        loss = -sum(a * lp.sum() for a, lp in zip(advantages.tolist(), logps)) / max(tokens, 1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        audit = torch.tensor([r["audit"] for r in records])
        record = {"step": step + 1, "reward": float(rewards.mean()),
                  "reward_s0": float(rewards[~audit].mean()), "reward_s1": float(rewards[audit].mean()),
                  "loss": float(loss.detach()), "tokens_per_completion": tokens / len(out.tokens)}
        curve.append(record)
        if log:
            log(record)
    model.eval()
    return curve
