"""GRPO in plain PyTorch on a ``transformers`` causal LM: the study's RL stage.

Each step draws ``prompts`` problems, samples ``group`` completions of each at temperature 1,
rewards a completion 1 when the answer it states is right (else 0), and takes one Adam step on
``-sum_t A_i log pi(y_it)`` averaged over the step's completion tokens, with the group-relative
advantage ``A_i = (r_i - mean_group) / (std_group + 1e-4)``. One update per batch of samples
(fully on-policy, so PPO's ratio is 1 and its clip inactive), no KL term (as the paper's RL).
"""

import random
from dataclasses import dataclass

import torch

from megatron_gift.demo.chains import chain_problem
from megatron_gift.demo.synthetic import answer_of
from megatron_gift.data.formatting import prompt_ids
from megatron_gift.evaluation.sampling import sample, sequence_logprobs


@dataclass
class GRPOSettings:
    steps: int = 40
    prompts: int = 16
    group: int = 8
    lr: float = 1e-4
    max_new_tokens: int = 24
    clip_grad: float = 1.0
    chain_steps: int = 2


def grpo(model, tokenizer, settings: GRPOSettings, seed: int, log=None) -> list[dict]:
    """Train ``model`` in place; returns one record per step (mean reward, tokens, loss)."""
    rng = random.Random(10_000 + seed)
    generator = torch.Generator().manual_seed(20_000 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.99))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    curve = []
    for step in range(settings.steps):
        problems = [chain_problem(rng, settings.chain_steps) for _ in range(settings.prompts)]
        prompts = [prompt_ids(tokenizer, p) for p, _ in problems for _ in range(settings.group)]
        answers = [answer_of(r["stepwise"]) for _, r in problems for _ in range(settings.group)]
        model.eval()
        out = sample(model, tokenizer, prompts, settings.max_new_tokens, generator)
        rewards = torch.tensor([float(answer_of(t) == a) for t, a in zip(out.texts, answers)])
        grouped = rewards.view(settings.prompts, settings.group)
        advantages = ((grouped - grouped.mean(1, keepdim=True))
                      / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        model.train()
        logps = sequence_logprobs(model, prompts, out.tokens, pad)
        tokens = sum(len(t) for t in out.tokens)
        loss = -sum(a * lp.sum() for a, lp in zip(advantages.tolist(), logps)) / max(tokens, 1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        record = {"step": step + 1, "reward": float(rewards.mean()), "loss": float(loss.detach()),
                  "tokens_per_completion": tokens / len(out.tokens)}
        curve.append(record)
        if log:
            log(record)
    model.eval()
    return curve
