"""SFT data: formats, chat templates and assistant masks, packing (down to the model's losses),
bad records, truncation, the on-disk cache (once per node) and the batch order.

Expected tokens are spelled out word by word and looked up in the vocabulary, so they do not
come from the code under test.
"""

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from megatron_gift.demo import synthetic
from megatron_gift.config import parse_config
from megatron_gift.data.dataset import SFTDataset, micro_batch_indices
from megatron_gift.errors import UserError
from support.parallel_harness import model_parallel, run_distributed, set_full_weights, tiny_gpt, tiny_gpt_config

# Role markers are words of the bundled vocabulary: system "where", user "Q:", assistant "A:".
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'system' %}where {{ m['content'] }} "
            "{% elif m['role'] == 'user' %}Q: {{ m['content'] }} "
            "{% else %}A: {{ m['content'] }} <eos> {% endif %}"
            "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
CHAT = [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"},
        {"role": "user", "content": "3 * 2"}, {"role": "assistant", "content": "6"}]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _words(tokenizer, text):
    """Ids of space-separated words, looked up one by one (digits are single words)."""
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in text.split()]


def _marked(tokenizer, text):
    """``(ids, mask)`` of words where ``[`` ... ``]`` encloses the trained words."""
    ids, mask, inside = [], [], False
    for word in text.split():
        if word in "[]":
            inside = word == "["
            continue
        ids += _words(tokenizer, word)
        mask.append(inside)
    return ids, mask


def _sample(data, index):
    ids, mask = data.sample(index)
    return ids.tolist(), mask.tolist()


@pytest.mark.parametrize("record,marked,templated", [
    ({"prompt": "Q: 1 + 2 = ?", "response": "3 . A: 3"},
     "<bos> Q: 1 + 2 = ? [ 3 . A: 3 <eos> ]", False),
    ({"text": "1 + 2 = 3"}, "<bos> [ 1 + 2 = 3 <eos> ]", False),
    ({"messages": CHAT}, "<bos> 1 + 2 [ 3 <eos> ] 3 * 2 [ 6 <eos> ]", False),
    ({"prompt": CHAT[:3], "response": "6"}, "<bos> 1 + 2 3 <eos> 3 * 2 [ 6 <eos> ]", False),
    ({"prompt": "1 + 2", "response": "3"}, "<bos> Q: 1 + 2 A: [ 3 <eos> ]", True),
    ({"messages": CHAT}, "<bos> Q: 1 + 2 A: [ 3 <eos> ] Q: 3 * 2 A: [ 6 <eos> ]", True),
    ({"messages": [{"role": "system", "content": "0"}] + CHAT[:2]},
     "<bos> where 0 Q: 1 + 2 A: [ 3 <eos> ]", True),
    ({"prompt": [{"role": "system", "content": "0"}, {"role": "user", "content": "1 + 2"}],
      "response": "3"}, "<bos> where 0 Q: 1 + 2 A: [ 3 <eos> ]", True),
])
def test_tokens_and_loss_mask(tmp_path, tokenizer, chat_tokenizer, record, marked, templated):
    tok = chat_tokenizer if templated else tokenizer
    data = SFTDataset(_jsonl(tmp_path / "d.jsonl", [record]), tok, 32,
                      text_field="text" if "text" in record else None)
    assert _sample(data, 0) == _marked(tok, marked)


def test_demonstrations_start_as_the_pretraining_text_did(tmp_path, tokenizer):
    """Without a template a prompt/response record is the same token sequence as its raw text
    (bos first), so a base pretrained on text judges demonstrations in a context it knows; the
    two differ only in the loss mask. A tokenizer without bos (Qwen2's) starts with no token."""
    from megatron_gift.data.formatting import prompt_ids

    prompt, response = "Q: ( 1 + 2 ) * 3 = ?", "3 * 3 = 9 . A: 9"
    text = SFTDataset(_jsonl(tmp_path / "t.jsonl", [{"text": f"{prompt} {response}"}]),
                      tokenizer, 32, text_field="text")
    demo = SFTDataset(_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "response": response}]),
                      tokenizer, 32)
    (text_ids, _), (demo_ids, demo_mask) = _sample(text, 0), _sample(demo, 0)
    assert demo_ids == text_ids and demo_ids[0] == tokenizer.bos_token_id
    context = prompt_ids(tokenizer, prompt)
    assert demo_ids[:len(context)] == context and not any(demo_mask[:len(context)])
    no_bos = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    no_bos.bos_token = None
    assert prompt_ids(no_bos, prompt) == context[1:]


def test_batch_shifts_labels_and_pads(tmp_path, chat_tokenizer):
    data = SFTDataset(_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), chat_tokenizer, 16)
    batch = data.batch([0])
    ids = _words(chat_tokenizer, "<bos> Q: 1 + 2 A: 3 <eos> Q: 3 * 2 A: 6 <eos>")
    pad, x = chat_tokenizer.pad_token_id, -100
    assert len(ids) == 15 and batch["tokens"][0].tolist() == ids[:-1] + [pad] * 2
    assert batch["labels"][0].tolist() == [x] * 5 + ids[6:8] + [x] * 5 + ids[13:15] + [x] * 2
    assert batch["loss_mask"][0].tolist() == [float(v != x) for v in batch["labels"][0].tolist()]
    assert batch["position_ids"][0].tolist() == list(range(16))
    assert "segment_ids" not in batch


def test_prefix_unstable_template_names_the_record(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    tokenizer.chat_template = "{{ messages | length }} " + TEMPLATE  # the turn count leads
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: the chat template is not prefix-stable "
                                         r"at assistant turn 1"):
        SFTDataset(path, tokenizer, 32, malformed="skip")


def test_template_refusal_is_a_malformed_record(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}"
                               "{{ raise_exception('user first') }}{% endif %}" + TEMPLATE)
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:2]}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: the chat template refuses .*user first"):
        SFTDataset(path, tokenizer, 32)
    assert SFTDataset(path, tokenizer, 32, malformed="skip").skipped == 1


def _mixed_records():
    return [{"prompt": "Q: 1 + 2 = ?", "response": "3", "messages": None},
            {"prompt": None, "response": None, "messages": CHAT},
            {"prompt": "Q: 4 * 4 = ?", "response": "16", "messages": None}]


def test_jsonl_parquet_and_datasets_dir_agree(tmp_path, chat_tokenizer):
    import datasets

    records = _mixed_records()
    jsonl = _jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if v is not None}
                                          for r in records])
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[:1])}
                         ).save_to_disk(str(tmp_path / "ds"))
    loaded = [SFTDataset(p, chat_tokenizer, 32) for p in (jsonl, str(tmp_path / "d.parquet"),
                                                          str(tmp_path / "ds"))]
    expected = [_marked(chat_tokenizer, "<bos> Q: Q: 1 + 2 = ? A: [ 3 <eos> ]"),
                _marked(chat_tokenizer, "<bos> Q: 1 + 2 A: [ 3 <eos> ] Q: 3 * 2 A: [ 6 <eos> ]"),
                _marked(chat_tokenizer, "<bos> Q: Q: 4 * 4 = ? A: [ 1 6 <eos> ]")]
    for data in loaded:
        assert [_sample(data, i) for i in range(data.num_samples)] == expected
    test_split = SFTDataset(str(tmp_path / "ds"), chat_tokenizer, 32, split="test")
    assert test_split.num_samples == 1
    with pytest.raises(ValueError, match=r"ds: no split 'valid' \(it has \['test', 'train'\]\)"):
        SFTDataset(str(tmp_path / "ds"), chat_tokenizer, 32, split="valid")


GOOD = '{"prompt": "Q:", "response": "1"}\n'


@pytest.mark.parametrize("bad,reason", [
    ('{"prompt": "Q:"}', r"record has no non-empty string field 'response'"),
    ('{"prompt": "Q:", "response": " "}', r"record has no non-empty string field 'response'"),
    ('{"prompt": "Q:", "response": 7}', r"record has no non-empty string field 'response' \(got 7\)"),
    ('{"prompt": 5, "response": "1"}', r"record has no non-empty string field 'prompt' \(got 5\)"),
    ("not json", r"not a JSON record"),
    ("[1, 2]", r"record is a list, not an object"),
    ('{"messages": [{"role": "user", "content": "1"}]}', r"chat 'messages' has no assistant turn"),
    ('{"messages": "1 + 2"}', r"field 'messages' is not a non-empty list of messages"),
    ('{"messages": [{"role": "user", "content": "1"}, "2"]}', r"messages\[1\] is not a"),
    ('{"messages": [{"role": "assistant", "content": ""}]}',
     r"messages\[0\] \(assistant\) has no non-empty string content"),
    ('{"messages": [{"content": "1"}]}', r"messages\[0\] has no string role"),
    ('{"text": ""}', r"record has no non-empty string field 'text'"),
])
def test_malformed_records_are_rejected_or_skipped_by_line(tmp_path, tokenizer, bad, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + bad + "\n" + GOOD)  # the bad record is on line 3
    text_field = "text" if "text" in bad else None
    if text_field:
        path.write_text('{"text": "1"}\n\n' + bad + '\n{"text": "2"}\n')
    with pytest.raises(ValueError, match=rf"d.jsonl:3: {reason}.*data.malformed=reject"):
        SFTDataset(str(path), tokenizer, 16, text_field=text_field)
    data = SFTDataset(str(path), tokenizer, 16, text_field=text_field, malformed="skip")
    assert (data.num_records, data.num_samples, data.skipped) == (3, 2, 1)
    assert len(data.skipped_examples) == 1 and data.skipped_examples[0].startswith(f"{path}:3: ")


def test_a_jsonl_line_that_is_not_utf8_is_named_by_line_and_skipped_with_malformed_skip(
        tmp_path, tokenizer):
    """The bad line comes after more good lines than one buffered read holds: the line number
    is still exact."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() * 300 + b'{"prompt": "caf\xe9", "response": "1"}\n'
                     + GOOD.encode())
    with pytest.raises(UserError) as raised:
        SFTDataset(str(path), tokenizer, 16)
    message = str(raised.value)
    assert "\n" not in message
    assert message == (f"{path}:301: not UTF-8 text (byte 0xe9 at byte 16 of the line); save "
                       "the file as UTF-8 (data.malformed=reject; set data.malformed=skip, flag "
                       "--malformed skip, to leave such records out)")
    data = SFTDataset(str(path), tokenizer, 16, malformed="skip")
    assert (data.num_records, data.num_samples, data.skipped) == (302, 301, 1)
    assert data.skipped_examples == [f"{path}:301: not UTF-8 text (byte 0xe9 at byte 16 of the "
                                     "line); save the file as UTF-8"]


def test_a_utf8_byte_order_mark_at_the_start_of_a_jsonl_file_is_accepted(tmp_path, tokenizer):
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(GOOD + '{"prompt": "Q: 1", "response": "2"}\n')
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    data, expected = SFTDataset(str(marked), tokenizer, 16), SFTDataset(str(plain), tokenizer, 16)
    assert (data.num_records, data.num_samples, data.skipped) == (2, 2, 0)
    assert [_sample(data, i) for i in range(2)] == [_sample(expected, i) for i in range(2)]


def test_malformed_parquet_rows_are_named_by_row(tmp_path, tokenizer):
    records = [{"prompt": "Q:", "response": "1"}, {"prompt": "Q:", "response": None}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d.parquet row 1: record has no non-empty string"):
        SFTDataset(str(tmp_path / "d.parquet"), tokenizer, 16)


def test_only_the_first_skips_are_listed_and_all_bad_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "x\n" * 9)
    data = SFTDataset(str(path), tokenizer, 16, malformed="skip")
    assert data.skipped == 9 and [s.split(": ")[0] for s in data.skipped_examples] == [
        f"{path}:{line}" for line in range(2, 7)]
    path.write_text("x\n")
    with pytest.raises(ValueError, match="none of its 1 records is usable"):
        SFTDataset(str(path), tokenizer, 16, malformed="skip")


@pytest.mark.parametrize("content,error,message", [
    ("\n", ValueError, r"data file has no records"),
    (None, FileNotFoundError, r"data file not found: .*d.jsonl"),
])
def test_empty_or_missing_file_is_named(tmp_path, tokenizer, content, error, message):
    if content is not None:
        (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(error, match=message):
        SFTDataset(str(tmp_path / "d.jsonl"), tokenizer, 16)


def test_overlong_records_are_cut_or_rejected(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1 + 2 = ?", "response": "3 . A: 3"},
                                         {"prompt": "Q:", "response": "1"}])
    cut = SFTDataset(path, tokenizer, seq_length=5, overlong="truncate")
    assert cut.truncated == 1 and _sample(cut, 0) == _marked(tokenizer, "<bos> Q: 1 + 2 =")
    with pytest.raises(ValueError, match=r"d.jsonl:1: 12 tokens exceed seq_length \+ 1 = 6"):
        SFTDataset(path, tokenizer, seq_length=5, overlong="reject")


def _packing_records():
    # Input positions (bos + prompt + response + eos, less 1): 3, 5, 4, 8. Best-fit decreasing
    # into 8 positions puts the 8 alone, the 5 in a new sequence, the 4 in a third (it does not
    # fit beside the 5), and the 3 beside the 5, the tightest fit.
    return [{"prompt": "1", "response": "2"}, {"prompt": "3 + 4", "response": "7"},
            {"prompt": "5", "response": "6 6"}, {"prompt": "9 9 9 9 9 9", "response": "1"}]


def test_packing_tokens_labels_positions_segments_and_mask(tmp_path, tokenizer):
    from megatron_gift.engine.pipeline import causal_attention_mask

    path = _jsonl(tmp_path / "d.jsonl", _packing_records())
    data = SFTDataset(path, tokenizer, 8, pack=True)
    assert (len(data), data.num_samples) == (3, 4)
    batch = data.batch([0, 1])
    w = lambda text: _words(tokenizer, text)  # noqa: E731
    pad, eos, x = tokenizer.pad_token_id, tokenizer.eos_token_id, -100
    assert batch["tokens"].tolist() == [w("<bos> 1 2 <bos> 3 + 4 7"), w("<bos> 5 6 6") + [pad] * 4]
    assert batch["labels"].tolist() == [[x] + w("2") + [eos, x, x, x] + w("7") + [eos],
                                        [x] + w("6 6") + [eos] + [x] * 4]
    assert batch["loss_mask"].sum().item() == 7  # the real loss tokens, padding excluded
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    allowed = [["10000000", "11000000", "11100000", "00010000",
                "00011000", "00011100", "00011110", "00011111"],
               ["10000000", "11000000", "11100000", "11110000",  # padding sees only padding
                "00001000", "00001100", "00001110", "00001111"]]
    blocked = [[[c == "0" for c in row] for row in rows] for rows in allowed]
    mask = causal_attention_mask(batch)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[:, 0].tolist() == blocked
    unpacked = SFTDataset(path, tokenizer, 8)
    assert causal_attention_mask(unpacked.batch([0]))[0, 0].tolist() == [
        [k > q for k in range(8)] for q in range(8)]


def _packed_equals_unpacked(path, tokenizer_dir, vocab, seq, out):
    import torch.nn.functional as F

    from megatron_gift.core.model import GiftModel
    from megatron_gift.engine.pipeline import causal_attention_mask, forward_step_func
    from megatron_gift.loss.objectives import GiftLoss

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    packed, single = (SFTDataset(path, tokenizer, seq, pack=p) for p in (True, False))
    with model_parallel(), torch.no_grad():
        model = tiny_gpt(tiny_gpt_config(), vocab, seq)
        set_full_weights([model])

        def per_token(batch, mask):
            logits = model(batch["tokens"], batch["position_ids"], mask)
            return F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")

        def loss_sums(data):
            step = forward_step_func(GiftLoss(math.inf, 0.0, vocab), causal_attention_mask)
            batches = iter(data.batch([i]) for i in range(len(data)))
            sums = [loss_func(out)[:2] for out, loss_func in
                    (step(batches, GiftModel(model)) for _ in range(len(data)))]
            return sum(float(s) for s, _ in sums), sum(int(n) for _, n in sums)

        alone = [per_token(single.batch([i]), causal_attention_mask(single.batch([i])))[0]
                 for i in range(len(single))]
        batch = packed.batch(list(range(len(packed))))
        together = per_token(batch, causal_attention_mask(batch))
        leaky = per_token(batch, causal_attention_mask({"tokens": batch["tokens"]}))
        index_of = {tuple(single.sample(i)[0][:-1].tolist()): i for i in range(len(single))}
        result = {"max_error": 0.0, "max_leak": 0.0, "compared": 0}
        for row in range(len(packed)):
            segments = batch["segment_ids"][row]
            for segment in range(1, int(segments.max()) + 1):
                where = (segments == segment).nonzero().flatten()
                target = batch["labels"][row, where] != -100
                sample = index_of[tuple(batch["tokens"][row, where].tolist())]
                reference = alone[sample][: len(where)][target]
                result["max_error"] = max(result["max_error"], float(
                    (together[row, where][target] - reference).abs().max()))
                result["max_leak"] = max(result["max_leak"], float(
                    (leaky[row, where][target] - reference).abs().max()))
                result["compared"] += int(target.sum())
        result["packed_sums"], result["single_sums"] = loss_sums(packed), loss_sums(single)
    torch.save(result, out)


@pytest.mark.distributed
def test_packed_losses_equal_unpacked_losses_in_a_megatron_gpt(tmp_path):
    records = [{"prompt": f"Q: {a} + {b} = ?", "response": f"{a} + {b} = {a + b} . A: {a + b}"}
               for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 9), (2, 7))]
    path = _jsonl(tmp_path / "d.jsonl", records)
    run_distributed(1, _packed_equals_unpacked, path, synthetic.TOKENIZER_DIR, 26, 40,
                    str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    assert result["compared"] > 0 and result["max_error"] < 1e-4, result
    assert result["max_leak"] > 1e-2, result  # without the block mask, samples see each other
    (packed_sum, packed_n), (single_sum, single_n) = result["packed_sums"], result["single_sums"]
    assert packed_n == single_n == result["compared"]
    assert packed_sum == pytest.approx(single_sum, rel=1e-5)


class _CountingCalls:
    """Counts calls of the tokenizer and its chat template while it is active."""

    def __init__(self, monkeypatch, tokenizer):
        self.calls = 0
        for name in ("__call__", "apply_chat_template"):
            original = getattr(type(tokenizer), name)
            monkeypatch.setattr(type(tokenizer), name, self._counted(original))

    def _counted(self, original):
        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return counted


def test_cache_is_reused_and_invalidated(tmp_path, chat_tokenizer, monkeypatch):
    counter = _CountingCalls(monkeypatch, chat_tokenizer)
    path = tmp_path / "d.jsonl"
    _jsonl(path, _mixed_records())

    def load(**options):
        before = counter.calls
        data = SFTDataset(str(path), chat_tokenizer, options.pop("seq", 32), **options)
        return data, counter.calls - before

    first, calls = load()
    assert calls > 0 and first.built and os.path.isfile(first.cache_path)
    again, calls = load()
    assert calls == 0 and not again.built and again.cache_path == first.cache_path
    assert [_sample(again, i) for i in range(3)] == [_sample(first, i) for i in range(3)]
    skip = {"malformed": "skip"}  # the changed fields below leave some records unusable
    for options in ({"seq": 31}, {"pack": True}, {"overlong": "reject"}, skip,
                    {**skip, "prompt_field": "question"}, {**skip, "response_field": "answer"},
                    {**skip, "messages_field": "chat"}, {**skip, "text_field": "prompt"}):
        assert load(**options)[1] > 0, options
    _jsonl(path, _mixed_records()[:2])
    assert load()[1] > 0
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    tokenizer.chat_template = TEMPLATE.replace("where", "(")
    assert SFTDataset(str(path), tokenizer, 32).cache_path != first.cache_path


def _load_on_a_rank(path, tokenizer_dir, cache_dir, out_dir):
    import torch.distributed as dist

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    calls = [0]
    original = type(tokenizer).__call__

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    type(tokenizer).__call__ = counted
    data = SFTDataset(path, tokenizer, 32, cache_dir=cache_dir)
    samples = [_sample(data, i) for i in range(data.num_samples)]
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"calls": calls[0], "built": data.built, "samples": samples}, f)


@pytest.mark.distributed
def test_ranks_of_a_node_tokenise_once(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", _mixed_records()[:1] * 50)
    run_distributed(2, _load_on_a_rank, path, synthetic.TOKENIZER_DIR, str(tmp_path / "c"),
                    str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] >= 50 and ranks[0]["built"]
    assert ranks[1]["calls"] == 0 and not ranks[1]["built"]
    assert ranks[0]["samples"] == ranks[1]["samples"] and len(ranks[0]["samples"]) == 50


def test_packed_seq_params_of_the_thd_format_follow_the_samples(tmp_path, tokenizer):
    """Where Transformer Engine is used, a packed micro-batch travels as one "thd" row: its
    cu_seqlens start a sequence at every sample and at every row's padding."""
    from megatron_gift.engine.pipeline import packed_seq_params

    data = SFTDataset(_jsonl(tmp_path / "d.jsonl", _packing_records()), tokenizer, 8, pack=True)
    batch = data.batch([0, 1, 2])
    segments = batch["segment_ids"]
    params = packed_seq_params(segments)
    assert params.qkv_format == "thd"
    cu = params.cu_seqlens_q.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_kv.tolist() == cu
    assert segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0],
                                 [1, 1, 1, 1, 1, 1, 1, 1]]
    expected, position = [], 0
    for row in segments.tolist():
        for k, segment in enumerate(row):
            if k == 0 or segment != row[k - 1]:
                expected.append(position + k)
        position += len(row)
    assert cu == expected + [3 * 8] == [0, 3, 8, 12, 16, 24]
    assert params.max_seqlen_q == params.max_seqlen_kv == 8
    # every sequence is one sample (or one row's padding): a single segment id, in one row
    flat = segments.reshape(-1)
    for start, end in zip(cu, cu[1:]):
        assert len(set(flat[start:end].tolist())) == 1 and start // 8 == (end - 1) // 8


def test_packing_with_transformer_engine_takes_the_thd_format(tmp_path, tokenizer,
                                                               monkeypatch):
    from megatron_gift.engine import trainer as training
    from megatron_gift.platform import te

    config = parse_config(["--train-path", _jsonl(tmp_path / "d.jsonl", _packing_records()),
                           "--pack"])
    monkeypatch.setattr(te, "available", lambda: True)
    assert training._packs_thd(config)
    assert training._dataset(config, config.data.train_path, tokenizer).pack
    monkeypatch.setattr(te, "available", lambda: False)
    assert not training._packs_thd(config)  # the local layers take the block-diagonal mask
    config.data.pack = False
    monkeypatch.setattr(te, "available", lambda: True)
    assert not training._packs_thd(config)


def test_the_thd_forward_step_flattens_the_micro_batch_and_keeps_the_loss(tmp_path, tokenizer,
                                                                         world_of_one):
    """The "thd" step hands the model one row of b * s tokens, no mask and the packed params;
    with a model whose logits depend on each token alone the loss is that of the masked step."""
    from megatron_gift.engine.pipeline import causal_attention_mask, forward_step_func
    from megatron_gift.loss.objectives import GiftLoss

    data = SFTDataset(_jsonl(tmp_path / "d.jsonl", _packing_records()), tokenizer, 8, pack=True)
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    seen = []

    class TokenWise(torch.nn.Module):
        post_process, device = True, torch.device("cpu")

        def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None):
            seen.append((tokens.shape, attention_mask is None, packed_seq_params))
            return table[tokens], table[tokens].flip(-1)

    results = []
    with torch.no_grad():
        for thd in (False, True):
            step = forward_step_func(GiftLoss(20.0, 0.0, vocab), causal_attention_mask, thd=thd)
            logits, loss_func = step(iter([data.batch([0, 1])]), TokenWise())
            results.append(loss_func(logits))
    (masked_sum, masked_n, masked), (thd_sum, thd_n, thd_report) = results
    assert seen[0][0] == (2, 8) and not seen[0][1] and seen[0][2] is None
    assert seen[1][0] == (1, 16) and seen[1][1]
    assert seen[1][2].cu_seqlens_q.tolist() == [0, 3, 8, 12, 16]
    assert int(thd_n) == int(masked_n) == 7
    torch.testing.assert_close(thd_sum, masked_sum)
    for key in masked:
        torch.testing.assert_close(thd_report[key], masked[key])


def test_training_log_reports_cuts_and_skips(tmp_path, tokenizer):
    from megatron_gift.engine.trainer import _data_report

    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "oops\n" + '{"prompt": "Q: 1 + 2 = ?", "response": "3 . A: 3"}\n')
    data = SFTDataset(str(path), tokenizer, 5, malformed="skip", pack=True)
    lines = _data_report("train", data, 5)
    assert lines[0].startswith("data (train): 3 records -> 2 samples packed into 2 sequences")
    assert "cut 1 of 2 samples to seq_length + 1 = 6 tokens" in lines[1]
    assert f"skipped 1 malformed records (data.malformed=skip), first: {path}:2: not a JSON" in lines[2]


def test_batch_order_is_a_resumable_function_of_consumed_samples():
    whole = [micro_batch_indices(10, k * 4, 4, 2, 0, 1, seed=3) for k in range(5)]
    flat = [i for step in whole for mb in step for i in mb]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    assert micro_batch_indices(10, 8, 4, 2, 0, 1, seed=3) == whole[2]
    ranks = [micro_batch_indices(10, 4, 4, 1, r, 2, seed=3) for r in range(2)]
    assert [i for r in ranks for mb in r for i in mb] == [i for mb in whole[1] for i in mb]


@pytest.mark.parametrize("argv,message", [
    (["--malformed", "drop"], r"data.malformed \(--malformed\) must be one of reject, skip"),
    (["--split", "train", "--pack", "--cache-dir", "/tmp/c", "data.pak=true"],
     "unknown key 'data.pak'; did you mean data.pack"),
])
def test_bad_data_options_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_bundled_tokenizer_is_reproducible(tokenizer):
    fresh = synthetic.build_tokenizer()
    assert fresh.get_vocab() == tokenizer.get_vocab()
    text = "Q: ( 12 - 3 ) * 4 = ? 12 - 3 = 9 , 9 * 4 = 36 . A: 36"
    assert fresh(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_styles_agree_on_the_answer():
    import random

    rng = random.Random(0)
    for _ in range(50):
        _, responses = synthetic.problem(rng)
        assert len({synthetic.answer_of(r) for r in responses.values()}) == 1
        assert len(set(responses.values())) == len(synthetic.STYLES)


def test_token_ids_outside_the_models_vocab_are_refused_once_at_load(tmp_path, tokenizer):
    """Checked on the host when the data set is loaded, naming the id, the vocab and the fix."""
    from megatron_gift.engine import trainer

    data = SFTDataset(_jsonl(tmp_path / "d.jsonl", [{"text": "12 + 7"}]), tokenizer, 32,
                      text_field="text")
    trainer._check_token_ids(data, data.max_token_id + 1)  # the ids fit
    with pytest.raises(ValueError, match=rf"token id {data.max_token_id}, outside the model's "
                                         rf"vocab of {data.max_token_id}: .*--tokenizer"):
        trainer._check_token_ids(data, data.max_token_id)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_data_error_on_two_ranks_leaves_nothing_in_the_cache(tmp_path):
    """A training job on two ranks fails with the record's error; the failure marker the
    waiting rank read is gone afterwards, also when the launcher stops the working rank while
    it shows the marker."""
    from support.parallel_harness import TINY_MODEL, train_on_ranks

    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1 ="}])  # no response
    overrides = {"model": dict(TINY_MODEL), "gift": {"beta": float("inf")},
                 "data": {"train_path": path, "cache_dir": str(tmp_path / "c")},
                 "training": {"micro_batch_size": 1, "global_batch_size": 2},
                 "logging": {"progress": False}}
    with pytest.raises(Exception, match="d.jsonl:1"):
        train_on_ranks(overrides, world_size=2)
    assert not (tmp_path / "c").exists() or os.listdir(tmp_path / "c") == []


def test_samples_truncated_to_no_response_token_are_refused_or_warned(tmp_path, tokenizer,
                                                                      monkeypatch):
    """Prompts as long as the sequence leave nothing to learn after truncation: all of them is
    refused before training (file, count, longest prompt, the flags to change), a share above
    5% gets one warning line."""
    from megatron_gift.engine import trainer

    warnings = []
    monkeypatch.setattr(trainer.log, "warning", warnings.append)
    long_prompt = " ".join(["1 + 2"] * 12)  # 36 words + bos: longer than seq_length + 1 = 17
    records = [{"prompt": long_prompt, "response": "3"}] * 4
    path = _jsonl(tmp_path / "long.jsonl", records)
    data = SFTDataset(path, tokenizer, 16)
    assert (data.emptied, data.longest_prompt, data.truncated) == (4, 37, 4)
    with pytest.raises(UserError, match=f"4 of 4 samples in {path} keep no response token after "
                                        "truncation to seq_length \\+ 1 = 17 tokens \\(the "
                                        "longest prompt has 37 tokens\\): nothing would be "
                                        "trained; raise --seq-length"):
        trainer._check_loss_tokens(data, 16)
    short = [{"prompt": "1 + 2", "response": "3"}]
    trainer._check_loss_tokens(SFTDataset(_jsonl(tmp_path / "mixed.jsonl", records[:1] + short * 9),
                                          tokenizer, 16), 16)
    assert len(warnings) == 1 and "1 of 10 samples" in warnings[0]
    trainer._check_loss_tokens(SFTDataset(_jsonl(tmp_path / "few.jsonl", records[:1] + short * 30),
                                          tokenizer, 16), 16)
    assert len(warnings) == 1  # 1 in 31 is under 5%: no line
