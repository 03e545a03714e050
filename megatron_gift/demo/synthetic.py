"""The embedded default world: a deterministic two-step arithmetic task with several valid
solution styles, and the word-level tokenizer that spells it.

A base model pretrained on all styles has real alternatives at every step; the demonstration
set uses one style only, which plain SFT collapses onto and GIFT keeps the base's spread over::

    Q: ( 3 + 4 ) * 2 = ?
    stepwise: 3 + 4 = 7 , 7 * 2 = 14 . A: 14
    backward: 7 * 2 = 14 where 3 + 4 = 7 . A: 14
    compact:  ( 7 ) * 2 = 14 . A: 14

Numbers are spelled digit by digit, so the vocabulary is small and closed.
"""

import json
import random
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_gift.assets import TOKENIZER_DIR  # the bundled tokenizer, this world's words

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

STYLES = ("stepwise", "backward", "compact")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
WORDS = tuple("0123456789") + ("+", "-", "*", "(", ")", "=", "?", ",", ".", "Q:", "A:", "where")


def problem(rng: random.Random) -> tuple[str, dict[str, str]]:
    """One problem: ``(prompt, {style: response})``, responses ending in the answer."""
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    first_op, second_op = rng.choice("+-*"), rng.choice("+-*")
    inner = _apply(a, first_op, b)
    answer = _apply(inner, second_op, c)
    step1, step2 = f"{a} {first_op} {b} = {inner}", f"{inner} {second_op} {c} = {answer}"
    responses = {
        "stepwise": f"{step1} , {step2} . A: {answer}",
        "backward": f"{step2} where {step1} . A: {answer}",
        "compact": f"( {inner} ) {second_op} {c} = {answer} . A: {answer}",
    }
    return f"Q: ( {a} {first_op} {b} ) {second_op} {c} = ?", responses


def answer_of(response: str) -> Optional[str]:
    """The final answer a response states, or None."""
    tail = response.rsplit("A:", 1)
    return tail[1].strip().replace(" ", "") if len(tail) == 2 else None


def write_pretraining_corpus(path: str, num_samples: int, seed: int) -> None:
    """JSONL of ``{"text": ...}``: prompt and a solution, styles uniformly mixed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_samples):
            prompt, responses = problem(rng)
            f.write(json.dumps({"text": f"{prompt} {responses[rng.choice(STYLES)]}"}) + "\n")


def write_demonstrations(path: str, num_samples: int, seed: int,
                         style: str = "stepwise") -> None:
    """JSONL of ``{"prompt", "response", "answer"}`` in one style (the SFT/GIFT data)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_samples):
            prompt, responses = problem(rng)
            record = {"prompt": prompt, "response": responses[style],
                      "answer": answer_of(responses[style])}
            f.write(json.dumps(record) + "\n")


def build_tokenizer(extra_words: Sequence[str] = ()) -> "PreTrainedTokenizerFast":
    """The world's word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``, with
    ``extra_words`` appended to its vocabulary (the bundled tokenizer has none). Like Llama's,
    it puts bos before a text when asked for special tokens (``tokenizer(text)``), so tools that
    encode prompts that way (TRL) start them as the trainer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + tuple(extra_words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def _apply(x, op, y):
    return x + y if op == "+" else x - y if op == "-" else x * y


if __name__ == "__main__":  # regenerate the stored tokenizer
    build_tokenizer().save_pretrained(TOKENIZER_DIR)
