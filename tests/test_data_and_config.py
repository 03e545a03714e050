"""SFT data (masks, batches, order, bad records), the run configuration, the bundled world."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from megatron_gift import synthetic
from megatron_gift.config import parse_config
from megatron_gift.data import SFTDataset, micro_batch_indices


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_response_only_mask_and_shifted_labels(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1 + 2 = ?", "response": "3 . A: 3"}])
    data = SFTDataset(path, tokenizer, seq_length=12)
    batch = data.batch([0])
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, response = ids("Q: 1 + 2 = ?"), ids("3 . A: 3") + [tokenizer.eos_token_id]
    full = prompt + response
    assert batch["tokens"][0, : len(full) - 1].tolist() == full[:-1]
    # Labels are the next tokens, only where the next token belongs to the response (+ eos).
    expected_labels = [-100] * (len(prompt) - 1) + response + [-100] * (12 - len(full) + 1)
    assert batch["labels"][0].tolist() == expected_labels
    assert batch["loss_mask"][0].tolist() == [float(x != -100) for x in expected_labels]
    assert batch["position_ids"][0].tolist() == list(range(12))
    assert (batch["tokens"][0, len(full):] == tokenizer.pad_token_id).all()


def test_text_records_train_on_every_token(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "1 + 2 = 3"}])
    batch = SFTDataset(path, tokenizer, seq_length=8, text_field="text").batch([0])
    n = len(tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert batch["loss_mask"][0].tolist() == [1.0] * n + [0.0] * (8 - n)
    assert batch["tokens"][0, 0] == tokenizer.bos_token_id


def test_parquet_with_custom_fields_equals_jsonl(tmp_path, tokenizer):
    records = [{"sft_prompt": "Q: 2 * 3 = ?", "solution": "6 . A: 6"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    from_parquet = SFTDataset(str(tmp_path / "d.parquet"), tokenizer, 16,
                              prompt_field="sft_prompt", response_field="solution")
    from_jsonl = SFTDataset(_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q: 2 * 3 = ?", "response": "6 . A: 6"}]), tokenizer, 16)
    for key, value in from_parquet.batch([0]).items():
        assert torch.equal(value, from_jsonl.batch([0])[key]), key


def test_overlong_records_are_cut_or_rejected(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1 + 2 = ?", "response": "3 . A: 3"},
                                         {"prompt": "Q:", "response": "1"}])
    cut = SFTDataset(path, tokenizer, seq_length=5, overlong="truncate")
    assert cut.truncated == 1 and len(cut.samples[0][0]) == 6
    with pytest.raises(ValueError, match=r"d.jsonl:1: 11 tokens exceed seq_length \+ 1 = 6"):
        SFTDataset(path, tokenizer, seq_length=5, overlong="reject")


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "Q:"}\n', r"d.jsonl:1: record has no non-empty string field 'response'"),
    ('{"prompt": "Q:", "response": "1"}\n{"prompt": "Q:", "response": ""}\n',
     r"d.jsonl:2: record has no non-empty string field 'response'"),
    ('{"prompt": "Q:", "response": 7}\n', r"d.jsonl:1: record has no non-empty string field"),
    ("not json\n", r"d.jsonl:1: not a JSON record"),
    ("\n", r"data file has no records"),
])
def test_bad_records_are_reported_with_their_line(tmp_path, tokenizer, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        SFTDataset(str(tmp_path / "d.jsonl"), tokenizer, 16)


def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        SFTDataset(str(tmp_path / "nope.jsonl"), tokenizer, 16)


def test_batch_order_is_a_resumable_function_of_consumed_samples():
    whole = [micro_batch_indices(10, k * 4, 4, 2, 0, 1, seed=3) for k in range(5)]
    flat = [i for step in whole for mb in step for i in mb]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    assert micro_batch_indices(10, 8, 4, 2, 0, 1, seed=3) == whole[2]
    ranks = [micro_batch_indices(10, 4, 4, 1, r, 2, seed=3) for r in range(2)]
    assert [i for r in ranks for mb in r for i in mb] == [i for mb in whole[1] for i in mb]


def test_flags_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("gift: {beta: 5.0}\nparallel: {tensor_model_parallel_size: 4}\n")
    config = parse_config(["--config", str(recipe), "--tensor-model-parallel-size", "2",
                           "--gift-beta", "inf", "--reference-load", "/ckpt", "--no-bf16",
                           "training.seed=7"])
    assert config.parallel.tensor_model_parallel_size == 2 and math.isinf(config.gift.beta)
    assert config.gift.reference_load == "/ckpt" and config.training.seed == 7
    assert parse_config([], defaults={"gift": {"beta": 1.0}}).gift.beta == 1.0


@pytest.mark.parametrize("argv,message", [
    (["--gift-beta", "-1"], "gift.beta .* must be >= 0"),
    (["--gift-beta", "nan"], "gift.beta .* must be >= 0"),
    (["--gift-smooth-lambda", "2"], "smooth_lambda must be in"),
    (["--overlong", "drop"], "data.overlong must be one of"),
    (["model.hiden_size=3"], "unknown config keys"),
    (["--train-iters", "0"], "training.train_iters must be positive"),
])
def test_bad_config_values_are_named(argv, message):
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
