"""The run configuration and the bundled world (tokenizer, task); the data is in test_data.py."""

import math

import pytest
from transformers import AutoTokenizer

from megatron_gift import synthetic
from megatron_gift.config import parse_config


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)


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
