"""The "audit chains" world: the reproduction study's test of GIFT's mechanism
(``examples/reproduce``).

The arithmetic chains of :mod:`megatron_gift.demo.chains`, where some prompts carry an audit
marker (one extra token, :data:`AUDIT_MARKER`) asking for the steps::

    Q: ( 3 + 4 ) * 2 = ?            regular (S0): a right final answer is enough
    Q: ( 3 + 4 ) * 2 = ? show       audit (S1): a right answer AND the first step 3 + 4 = 7 shown

Stepwise and backward solutions state the first equation; compact ones never do. The base is
pretrained on regular prompts answered mostly stepwise or backward and rarely compact, and on
audit prompts answered stepwise or backward only; the demonstrations are regular prompts in the
compact style (the most accurate style, which the base rarely uses). The reward needs the
undemonstrated behaviour on audit prompts: the prior knowledge GIFT is meant to keep.
"""

import json
import random
import re
from typing import Iterable, Optional, Sequence

from megatron_gift.demo.chains import chain_problem, classify_style
from megatron_gift.demo.synthetic import answer_of

AUDIT_MARKER = "show"
STEPPED = ("stepwise", "backward")  # the styles that state every equation


def problem(rng: random.Random, steps: int, audit: bool) -> dict:
    """One record: ``prompt``, ``responses`` ({style: text}), ``answer``, ``first_equation``
    (``"a o b = r"``), ``expression`` (the prompt without marker), ``audit``, ``steps``."""
    prompt, responses = chain_problem(rng, steps)
    first = responses["stepwise"].split(" , ")[0].split(" . ")[0]
    return {"prompt": f"{prompt} {AUDIT_MARKER}" if audit else prompt, "responses": responses,
            "answer": answer_of(responses["stepwise"]), "first_equation": first,
            "expression": prompt, "audit": audit, "steps": steps}


def states_first_equation(text: str, first_equation: str) -> bool:
    """Whether a completion shows the chain's first step: ``a o b = <number>`` with the first
    operation's operands and operator (spaces ignored; not part of a longer number). What the
    audit asks for is the step shown; whether its result is right is judged by the final
    answer (a wrong first result almost always gives a wrong answer)."""
    body = text.rsplit("A:", 1)[0].replace(" ", "")
    left = first_equation.split("=")[0].replace(" ", "")
    pattern = r"(?<![0-9)])" + re.escape(left) + r"=-?[0-9]+"
    return re.search(pattern, body) is not None


def is_correct(text: str, record: dict) -> bool:
    """The RL objective: the right final answer, and on audit prompts the first equation too."""
    if answer_of(text) != record["answer"].replace(" ", ""):
        return False
    return not record["audit"] or states_first_equation(text, record["first_equation"])


def held_out(records: Iterable[dict]) -> set[str]:
    """The expressions of ``records``: held out of pretraining, demonstrations and RL."""
    return {r["expression"] for r in records}


def eval_set(n: int, seed: int, steps: int, audit: bool, exclude: set[str] = frozenset()
             ) -> list[dict]:
    """``n`` records with distinct expressions, none in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        record = problem(rng, steps, audit)
        if record["expression"] not in seen:
            seen.add(record["expression"])
            out.append(record)
    return out


def _draw(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def corpus(n: int, seed: int, exclude: set[str], long_share: float, audit_share: float,
           regular_styles: dict[str, float], audit_styles: dict[str, float]) -> list[dict]:
    """Pretraining ``{"prompt", "response"}`` records: two-step chains (three-step with
    probability ``long_share``), audit prompts with probability ``audit_share``; each answered
    in a style drawn from the weights of its kind; no expression from ``exclude``."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        audit = rng.random() < audit_share
        record = problem(rng, 3 if rng.random() < long_share else 2, audit)
        if record["expression"] in exclude:
            continue
        style = _draw(rng, audit_styles if audit else regular_styles)
        out.append({"prompt": record["prompt"], "response": record["responses"][style]})
    return out


def demonstrations(n: int, seed: int, exclude: set[str], style: str = "compact") -> list[dict]:
    """Regular two-step ``{"prompt", "response", "answer"}`` records in one ``style``."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        record = problem(rng, 2, audit=False)
        if record["expression"] not in exclude:
            out.append({"prompt": record["prompt"], "response": record["responses"][style],
                        "answer": record["answer"]})
    return out


class PromptStream:
    """The RL prompt stream: half regular, half audit two-step records, none held out; one
    ``seed`` gives every arm the same stream."""

    def __init__(self, seed: int, exclude: set[str], audit_share: float = 0.5):
        self.rng, self.exclude, self.audit_share = random.Random(seed), exclude, audit_share

    def draw(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            record = problem(self.rng, 2, audit=len(out) % 2 == 1 if self.audit_share == 0.5
                             else self.rng.random() < self.audit_share)
            if record["expression"] not in self.exclude:
                out.append(record)
        return out


def fork_token(tokenizer, style: str = "compact") -> int:
    """The id of the first response token of ``style``, the token that picks the style
    (compact: ``(``; stepwise and backward start with a digit)."""
    text = {"compact": "(", "stepwise": "1", "backward": "1"}[style]
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def style_of(text: str) -> str:
    """The style of a completion (:func:`megatron_gift.demo.chains.classify_style`)."""
    return classify_style(text)


def write_jsonl(path: str, records: Sequence[dict], keys: Optional[Sequence[str]] = None) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in keys} if keys else r) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
