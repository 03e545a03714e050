"""Arithmetic chains of any length in the embedded world's three solution styles: the world of
the reproduction study (``examples/reproduce``).

A chain of ``n`` operations nests to the left, ``( ( a o b ) o c ) o d``; its solution states
every intermediate result in one of three styles, which for ``n = 2`` are exactly those of
:func:`megatron_gift.demo.synthetic.problem` (same draws from the same ``rng``, same text)::

    Q: ( ( 3 + 4 ) * 2 ) - 5 = ?
    stepwise: 3 + 4 = 7 , 7 * 2 = 14 , 14 - 5 = 9 . A: 9
    backward: 14 - 5 = 9 where 7 * 2 = 14 where 3 + 4 = 7 . A: 9
    compact:  ( 7 ) * 2 = 14 , ( 14 ) - 5 = 9 . A: 9

The study's split: the base model is pretrained on two-step chains (most) and three-step chains
(some), all styles mixed; demonstrations and RL prompts are two-step chains only, so three-step
chains are held out of post-training (the out-of-distribution evaluation).
"""

import json
import random
import re
from typing import Callable, Optional, Sequence

from megatron_gift.demo.synthetic import STYLES, _apply, answer_of

__all__ = ["STYLES", "chain_problem", "classify_style", "write_corpus", "write_problems"]


def chain_problem(rng: random.Random, steps: int = 2) -> tuple[str, dict[str, str]]:
    """One chain of ``steps`` operations on digits 1-9: ``(prompt, {style: response})``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    numbers = [rng.randint(1, 9) for _ in range(steps + 1)]
    ops = [rng.choice("+-*") for _ in range(steps)]
    results, value, expression = [], numbers[0], str(numbers[0])
    equations = []
    for op, operand in zip(ops, numbers[1:]):
        new = _apply(value, op, operand)
        equations.append((value, op, operand, new))
        results.append(new)
        expression = f"( {expression} {op} {operand} )"
        value = new
    answer = value
    said = [f"{x} {op} {y} = {r}" for x, op, y, r in equations]
    compact = [f"( {x} ) {op} {y} = {r}" for x, op, y, r in equations[1:]] or said
    responses = {
        "stepwise": f"{' , '.join(said)} . A: {answer}",
        "backward": f"{' where '.join(reversed(said))} . A: {answer}",
        "compact": f"{' , '.join(compact)} . A: {answer}",
    }
    return f"Q: {expression[2:-2]} = ?", responses


# A prompt of the arithmetic world (two-step problems and longer chains alike).
_PROMPT = re.compile(r"Q: [0-9()+\-* ]+ = \?")


def is_arithmetic_world(records: Sequence[dict]) -> bool:
    """Whether every record's prompt is one of this world's, the only prompts whose solution
    styles (:func:`classify_style`) mean something."""
    return all(isinstance(r["prompt"], str) and _PROMPT.fullmatch(r["prompt"]) for r in records)


def style_classifier(records: Sequence[dict]) -> Optional[Callable[[str], str]]:
    """The evaluation's style plug-in for ``records``: :func:`classify_style` where they are this
    world's prompts, else None."""
    return classify_style if is_arithmetic_world(records) else None


def classify_style(response: str) -> str:
    """Which style a response is written in: a name from :data:`STYLES`, or ``"other"``."""
    body = response.rsplit("A:", 1)[0]
    if "where" in body:
        return "backward"
    if body.lstrip().startswith("("):
        return "compact"
    if "=" in body:
        return "stepwise"
    return "other"


def write_corpus(path: str, num_samples: int, seed: int, long_share: float = 0.25) -> None:
    """Pretraining JSONL ``{"text"}``: two-step chains, and three-step ones with probability
    ``long_share``; each in a uniformly drawn style."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_samples):
            steps = 3 if rng.random() < long_share else 2
            prompt, responses = chain_problem(rng, steps)
            f.write(json.dumps({"text": f"{prompt} {responses[rng.choice(STYLES)]}"}) + "\n")


def write_problems(path: str, num_samples: int, seed: int, steps: int = 2,
                   style: str = "stepwise", unique: bool = False) -> None:
    """JSONL ``{"prompt", "response", "answer", "steps"}``: demonstrations in one ``style``
    (the SFT/GIFT data) or, with ``unique``, distinct prompts for evaluation."""
    rng = random.Random(seed)
    seen, written = set(), 0
    with open(path, "w") as f:
        while written < num_samples:
            prompt, responses = chain_problem(rng, steps)
            if unique and prompt in seen:
                continue
            seen.add(prompt)
            written += 1
            record = {"prompt": prompt, "response": responses[style],
                      "answer": answer_of(responses[style]), "steps": steps}
            f.write(json.dumps(record) + "\n")
