"""The run configuration: typed sections, flags, recipes with inheritance, overrides, and
errors that name the key, its flag and where the bad value came from."""

import math
import os
import re
import subprocess
import sys

import pytest

from megatron_gift.config import JobConfig, parse_config
from megatron_gift.config.cli import build_parser
from megatron_gift.config.schema import SECTIONS, flag_name, section_fields
from megatron_gift.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("gift: {beta: 5.0}\nparallel: {tensor_model_parallel_size: 4}\n")
    config = parse_config(["--config", str(recipe), "--tensor-model-parallel-size", "2",
                           "--gift-beta", "inf", "--reference-load", "/ckpt", "--no-bf16",
                           "training.seed=7"])
    assert config.parallel.tensor_model_parallel_size == 2 and math.isinf(config.gift.beta)
    assert config.gift.reference_load == "/ckpt" and config.training.seed == 7
    assert parse_config([], defaults={"gift": {"beta": 1.0}}).gift.beta == 1.0
    assert parse_config(["--virtual-pipeline-model-parallel-size", "none",
                         "checkpoint.save=null"]).checkpoint.save is None


def test_values_take_their_field_types():
    config = parse_config(["--lr", "3e-4", "--train-iters", "12", "gift.beta=inf",
                           "training.bf16=true", "model.rotary_base=500000"])
    assert type(config.optimizer.lr) is float and config.training.train_iters == 12
    assert math.isinf(config.gift.beta) and config.training.bf16 is True
    assert type(config.model.rotary_base) is float


def test_every_field_has_a_flag_and_help():
    help_text = build_parser().format_help()
    for section in SECTIONS:
        for field in section_fields(section):
            assert field.metadata.get("help"), f"{section}.{field.name} has no help"
            assert flag_name(section, field.name) in help_text
    # --help shows the docs and the allowed values
    assert "finite temperature; inf is plain cross-entropy SFT" in help_text
    assert "{constant, linear, cosine}" in help_text
    assert flag_name("gift", "reference_load") == "--reference-load"
    assert flag_name("gift", "beta") == "--gift-beta"


@pytest.mark.parametrize("argv,message", [
    (["--gift-beta", "abc"], "--gift-beta: gift.beta must be a number (inf allowed), got 'abc'"),
    (["--train-iters", "ten"], "--train-iters: training.train_iters must be an integer, got 'ten'"),
    (["gift.beta=abc"], "override 'gift.beta=abc': gift.beta (--gift-beta) must be a number, "
                        "got 'abc'"),
    (["training.bf16=maybe"], "training.bf16 (--bf16) must be true or false, got 'maybe'"),
    (["--gift-beta", "-1"], "gift.beta (--gift-beta) must be >= 0"),
    (["--gift-beta", "nan"], "gift.beta must be a number, got 'nan'"),
    (["--gift-smooth-lambda", "2"], "gift.smooth_lambda (--gift-smooth-lambda) must be in [0, 1]"),
    (["--gift-soft-sft-weight", "1.5"],
     "gift.soft_sft_weight (--gift-soft-sft-weight) must be in [0, 1], got 1.5"),
    (["--gift-soft-sft-weight", "0.2", "--gift-beta", "inf"],
     "gift.soft_sft_weight (--gift-soft-sft-weight) needs a finite gift.beta"),
    (["--gift-soft-sft-weight", "0.2", "--gift-head", "fused"],
     "gift.soft_sft_weight (--gift-soft-sft-weight) takes the logits head only: set --gift-head logits"),
    (["--overlong", "drop"], "data.overlong (--overlong) must be one of truncate, reject; got 'drop'"),
    (["--train-iters", "0"], "training.train_iters (--train-iters) must be positive, got 0"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], "optimizer.min_lr=0.0001 exceeds optimizer.lr=1e-05"),
    (["--num-attention-heads", "6", "--num-query-groups", "4"],
     "model.num_attention_heads=6 is not a multiple of model.num_query_groups=4"),
])
def test_bad_values_name_the_key_and_flag(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(argv)


def test_the_soft_sft_weight_is_read_and_defaults_to_none():
    assert parse_config([]).gift.soft_sft_weight is None
    assert parse_config(["--gift-soft-sft-weight", "0.25"]).gift.soft_sft_weight == 0.25


def test_a_config_with_several_problems_is_refused_once_naming_them_all():
    """Five bad values of different kinds, a choice, a sign, a layout, a recompute setting and a
    relation between two keys: one error, on one line, each problem as it is named alone."""
    alone = {"--overlong": (["--overlong", "drop"], "data.overlong (--overlong) must be one of "
                                                     "truncate, reject; got 'drop'"),
             "--train-iters": (["--train-iters", "0"], "training.train_iters (--train-iters) "
                                                        "must be positive, got 0"),
             "--sequence-parallel": (["--sequence-parallel"], "parallel.sequence_parallel "
                                     "(--sequence-parallel) needs "
                                     "parallel.tensor_model_parallel_size"),
             "--recompute-method": (["--recompute-method", "block"], "training.recompute_method "
                                    "(--recompute-method) and training.recompute_num_layers"),
             "--min-lr": (["--lr", "1e-5", "--min-lr", "1e-4"],
                          "optimizer.min_lr=0.0001 exceeds optimizer.lr=1e-05")}
    for argv, message in alone.values():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(argv)
    with pytest.raises(ConfigError) as refused:
        parse_config([arg for argv, _ in alone.values() for arg in argv])
    text = str(refused.value)
    assert text.startswith("5 problems: (1) ") and "\n" not in text
    for number, (_, message) in enumerate(alone.values(), 1):
        assert re.search(rf"\({number}\) [^;]*{re.escape(message)}", text), (message, text)


@pytest.mark.parametrize("argv,message", [
    (["--gift-bta", "3"], "unrecognised flag --gift-bta; did you mean --gift-beta?"),
    (["--train-iter", "3"], "unrecognised flag --train-iter; did you mean --train-iters?"),
    (["--tensor-parallel-size=2"],
     "unrecognised flag --tensor-parallel-size; did you mean --tensor-model-parallel-size?"),
    (["gift.bta=3"], "unknown key 'gift.bta'; did you mean gift.beta?"),
    (["model.hiden_size=3"], "unknown key 'model.hiden_size'; did you mean model.hidden_size?"),
    (["--bf16", "1"], "'1' is neither a flag nor a section.key=value override"),
])
def test_mistyped_flags_and_keys_get_a_suggestion(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(argv)


def test_a_recipe_error_names_the_file_key_and_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  train_iters: ten\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"recipe {recipe}: training.train_iters (--train-iters) must be an integer, "
            "got 'ten'")):
        parse_config(["--config", str(recipe)])
    recipe.write_text("trainin:\n  train_iters: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"recipe {recipe}: unknown key 'trainin'; "
                                                    "did you mean training?")):
        parse_config(["--config", str(recipe)])


def test_recipes_inherit_their_defaults_in_order(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(
        "gift: {beta: 5.0, smooth_lambda: 0.01}\ntraining: {train_iters: 10, seed: 1}\n")
    (tmp_path / "common" / "long.yaml").write_text(
        "defaults: base.yaml\ntraining: {train_iters: 1000}\n")
    (tmp_path / "bf16.yaml").write_text("training: {bf16: true, seed: 2}\n")
    (tmp_path / "run.yaml").write_text(
        "defaults: [common/long.yaml, bf16.yaml]\ngift: {beta: 7.0}\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml"), "--seed", "3"])
    assert config.gift.beta == 7.0 and config.gift.smooth_lambda == 0.01  # own over base
    assert config.training.train_iters == 1000  # long over its parent base
    assert config.training.bf16 is True  # the second parent
    assert config.training.seed == 3  # flags over every recipe
    assert parse_config(["--config", str(tmp_path / "run.yaml")]).training.seed == 2


def test_recipe_cycles_and_missing_parents_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"recipe inheritance cycle: {a} -> {b} -> {a}")):
        parse_config(["--config", str(a)])
    (tmp_path / "c.yaml").write_text("defaults: gone.yaml\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"recipe not found: {tmp_path / 'gone.yaml'} (named in defaults: of "
            f"{tmp_path / 'c.yaml'})")):
        parse_config(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(ConfigError, match="recipe not found: .*nowhere.yaml$"):
        parse_config(["--config", str(tmp_path / "nowhere.yaml")])


def _recipe_error(path):
    """The message of the ConfigError that loading the recipe at ``path`` raises."""
    with pytest.raises(ConfigError) as raised:
        parse_config(["--config", str(path)])
    return str(raised.value)


def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  train_iters: 3\n bad: [1\n")
    message = _recipe_error(recipe)
    assert "\n" not in message
    assert message == (f"recipe {recipe} is not valid YAML: line 3, column 2: did not find "
                       "expected key (while parsing a block mapping at line 1, column 1)")
    recipe.write_text("gift:\n  beta: 5.0\n  beta: 6.0\n")
    assert _recipe_error(recipe) == (
        f"recipe {recipe} is not valid YAML: line 3, column 3: found duplicate key beta "
        "(while constructing a mapping at line 2, column 3)")


def test_a_yaml_error_in_an_inherited_recipe_names_it_and_its_child(tmp_path):
    (tmp_path / "base.yaml").write_text("training: {train_iters: 3\n")
    (tmp_path / "run.yaml").write_text("defaults: base.yaml\n")
    message = _recipe_error(tmp_path / "run.yaml")
    assert "\n" not in message
    assert re.fullmatch(re.escape(f"recipe {tmp_path / 'base.yaml'} (named in defaults: of "
                                  f"{tmp_path / 'run.yaml'}) is not valid YAML: line 2, column 1: ")
                        + r".+ \(while parsing a flow mapping at line 1, column 11\)", message)


@pytest.mark.parametrize("text,found", [("- training\n- gift\n", "a list at line 1, column 1"),
                                        ("train_iters\n", "the value 'train_iters' at line 1, "
                                                          "column 1"),
                                        ("42\n", "the value '42' at line 1, column 1")])
def test_a_recipe_that_is_not_a_mapping_says_so(tmp_path, text, found):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert _recipe_error(recipe) == (f"recipe {recipe}: expected sections (a mapping such as "
                                     f"'training:' on its own line) at the top, got {found}")


def test_a_recipe_that_is_not_utf8_names_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"training:\n  train_iters: 3 # caf\xe9\n")
    assert _recipe_error(recipe) == (f"recipe {recipe}, line 2: byte 0xe9 is not UTF-8; save the "
                                     "recipe as UTF-8")
    recipe.write_bytes(b"\xef\xbb\xbftraining:\n  train_iters: 3\n")  # a UTF-8 BOM is fine
    assert parse_config(["--config", str(recipe)]).training.train_iters == 3
    recipe.write_text("")  # an empty recipe changes nothing
    assert parse_config(["--config", str(recipe)]) == parse_config([])


def test_the_bundled_recipes_parse_and_inherit():
    recipes = os.path.join(REPO, "examples", "recipes")
    gift = parse_config(["--config", os.path.join(recipes, "tiny_cpu.yaml")])
    sft = parse_config(["--config", os.path.join(recipes, "tiny_cpu_sft.yaml")])
    assert gift.parallel.pipeline_model_parallel_size == 2 and gift.gift.beta == 20.0
    assert math.isinf(sft.gift.beta) and sft.checkpoint.save == "runs/tiny_cpu_sft/checkpoints"
    assert sft.data == gift.data and sft.model == gift.model  # inherited


def test_schema_defaults_are_the_documented_ones():
    defaults = JobConfig()
    assert defaults.gift.beta == 20.0 and defaults.gift.smooth_lambda == 0.0
    assert defaults.optimizer.min_lr == 0.0  # Megatron-LM's; a larger one would exceed small lrs


@pytest.mark.system
def test_launcher_reports_a_bad_flag_in_one_line():
    """A user error is one ``error:`` line and exit status 2, no traceback, no torch import."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "pretrain_gift.py"),
                             "--gift-beta", "abc"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --gift-beta: gift.beta must be a number (inf allowed), got 'abc'"]
    assert result.stdout == ""


def test_the_fused_heads_chunk_is_checked_and_defaults_to_the_tile_budget():
    with pytest.raises(ConfigError, match=r"gift.head_chunk_tokens \(--gift-head-chunk-tokens\) "
                                          r"must be >= 1, got 0"):
        parse_config(["--gift-head", "fused", "--gift-head-chunk-tokens", "0"])
    config = parse_config(["--gift-head", "fused", "--sequence-parallel",
                           "--tensor-model-parallel-size", "2"])
    assert config.gift.head == "fused" and config.gift.head_chunk_tokens is None
