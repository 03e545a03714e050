"""One checked record (:class:`megatron_gift.records.Example`) -> token ids and loss mask.

With a chat template (``tokenizer.chat_template``), as in the official GIFT code:

* prompt/response: ``template([user: prompt], generation prompt) + response + eos``, the loss
  on the response and the eos (a verl-style prompt list is rendered as it is);
* chat: ``template(messages)``, the loss on every assistant turn with the tokens that end it
  (end-of-turn, eos). A turn's tokens are those between the render of the conversation before
  it (with the generation prompt) and the render up to it; both must be token prefixes of the
  whole conversation, or the template cannot be split into turns and the record is refused.

Without a template, every sequence starts with the tokenizer's bos token (when it has one),
as raw text does and as the base model saw its pretraining text: ``bos + prompt + response +
eos``, chat turns concatenated as they are after one bos (assistant turns each end with eos),
raw text ``bos + text + eos`` with the loss on all but the bos. A template writes its own start.
"""

from typing import TYPE_CHECKING

from jinja2 import TemplateError

from megatron_gift.data.records import Example, Malformed
from megatron_gift.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(example: Example,
           tokenizer: "PreTrainedTokenizerBase") -> tuple[list[int], list[bool]]:
    """``(ids, mask)`` of one example: equal-length lists of token ids and booleans, True where
    the token is a training target (the model learns to predict it from the tokens before)."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; responses and texts must end with one")
    if example.text is not None:
        ids = _start(tokenizer) + _ids(tokenizer, example.text) + [tokenizer.eos_token_id]
        return ids, [False] + [True] * (len(ids) - 1)
    if example.messages is not None:
        if tokenizer.chat_template:
            return _templated_chat(tokenizer, example.messages)
        ids, mask = _concatenated_chat(tokenizer, example.messages)
        start = _start(tokenizer)
        return start + ids, [False] * len(start) + mask
    context = prompt_ids(tokenizer, example.prompt)
    response_ids = _ids(tokenizer, example.response) + [tokenizer.eos_token_id]
    return context + response_ids, [False] * len(context) + [True] * len(response_ids)


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", prompt: "str | list[dict]") -> list[int]:
    """The token ids a response follows: the chat template's render with the generation prompt
    when the tokenizer has a template, else ``bos`` (when it has one) and the prompt's tokens
    (a prompt list of turns concatenated as they are). Sampling uses it too, so a policy is
    asked exactly as it was trained."""
    if tokenizer.chat_template:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _render(tokenizer, turns, generation_prompt=True)
    if isinstance(prompt, str):
        return _start(tokenizer) + _ids(tokenizer, prompt)
    return _start(tokenizer) + _concatenated_chat(tokenizer, prompt)[0]


def _start(tokenizer) -> list[int]:
    """``[bos]``, or nothing for a tokenizer without one (Qwen2's)."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _templated_chat(tokenizer, messages):
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        if not (len(before) < len(through) and through[: len(before)] == before
                and ids[: len(through)] == through):
            raise UserError(
                f"the chat template is not prefix-stable at assistant turn {k}: the render of "
                f"the turns before it (with the generation prompt) and the render up to it are "
                f"not growing token prefixes of the whole conversation, so its tokens cannot be "
                f"told apart; use prompt/response records or a prefix-stable template")
        mask[len(before): len(through)] = [True] * (len(through) - len(before))
    return ids, mask


def _concatenated_chat(tokenizer, messages):
    ids, mask = [], []
    for message in messages:
        assistant = message["role"] == "assistant"
        piece = _ids(tokenizer, message["content"]) + [tokenizer.eos_token_id] * assistant
        ids += piece
        mask += [assistant] * len(piece)
    return ids, mask


def _render(tokenizer, messages, generation_prompt):
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as error:
        raise Malformed(f"the chat template refuses the record: {error}") from None
    return _ids(tokenizer, text)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]
