"""One checked record (:class:`megatron_gift.records.Example`) -> token ids and loss mask.

With a chat template (``tokenizer.chat_template``), as in the official GIFT code:

* prompt/response: ``template([user: prompt], generation prompt) + response + eos``, the loss
  on the response and the eos (a verl-style prompt list is rendered as it is);
* chat: ``template(messages)``, the loss on every assistant turn with the tokens that end it
  (end-of-turn, eos). A turn's tokens are those between the render of the conversation before
  it (with the generation prompt) and the render up to it; both must be token prefixes of the
  whole conversation, or the template cannot be split into turns and the record is refused.

Without a template, turns are concatenated as they are (``prompt + response + eos``; chat
assistant turns each end with eos). Raw text is ``bos + text + eos`` with the loss on all.
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
        ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
        ids += _ids(tokenizer, example.text) + [tokenizer.eos_token_id]
        return ids, [False] + [True] * (len(ids) - 1)
    if example.messages is not None:
        if tokenizer.chat_template:
            return _templated_chat(tokenizer, example.messages)
        return _concatenated_chat(tokenizer, example.messages)
    prompt = example.prompt
    if tokenizer.chat_template:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_ids = _render(tokenizer, turns, generation_prompt=True)
    elif isinstance(prompt, str):
        prompt_ids = _ids(tokenizer, prompt)
    else:
        prompt_ids = _concatenated_chat(tokenizer, prompt)[0]
    response_ids = _ids(tokenizer, example.response) + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


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
