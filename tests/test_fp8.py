"""FP8 through Transformer Engine, as far as a CPU can check it: the flags map onto
Megatron-Core's ``TransformerConfig`` exactly (student and reference), every combination that
cannot work is refused up front, and FP8 is refused where Transformer Engine is missing, before
anything is built or written. TE's availability is faked both ways; FP8 itself needs a GPU."""

import builtins
import os
import re

import pytest
import torch

from megatron_gift.config import from_container, parse_config
from megatron_gift.core import model as models
from megatron_gift.errors import ConfigError, UserError
from megatron_gift.platform import te

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 64, "seq_length": 16}}
FP8 = ["--bf16", "--fp8-format", "hybrid"]


def _config(*flags: str):
    return parse_config(["--vocab-size", "64", *flags], defaults=TINY)


@pytest.fixture
def te_present(monkeypatch):
    monkeypatch.setattr(te, "available", lambda: True)


@pytest.fixture
def te_missing(monkeypatch):
    monkeypatch.setattr(te, "available", lambda: False)


# ---------------------------------------------------------------------------------------------
# The flags -> TransformerConfig


def test_without_fp8_both_models_have_no_fp8_fields():
    config = _config("--bf16")
    for frozen in (False, True):
        tf_config = models.transformer_config(config, torch.bfloat16, frozen=frozen)
        assert tf_config.fp8 is None and not tf_config.fp8_param
        assert not tf_config.first_last_layers_bf16


def test_the_fp8_flags_map_onto_the_transformer_config(te_present):
    config = _config(*FP8, "--fp8-recipe", "delayed", "--fp8-margin", "1",
                     "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
                     "--use-distributed-optimizer", "--fp8-param-gather")
    student = models.transformer_config(config, torch.bfloat16)
    assert (student.fp8, student.fp8_recipe, student.fp8_margin, student.fp8_amax_history_len,
            student.fp8_amax_compute_algo, student.fp8_param) == (
        "hybrid", "delayed", 1, 1024, "max", True)
    assert not student.first_last_layers_bf16
    reference = models.transformer_config(config, torch.bfloat16, frozen=True)
    assert reference.fp8 is None and not reference.fp8_param  # --reference-precision bf16
    assert student.bf16 and student.params_dtype == torch.bfloat16


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise", "mxfp8"])
def test_bf16_edge_layers_and_current_scaling_recipes(te_present, recipe):
    config = _config("--bf16", "--fp8-format", "e4m3", "--fp8-recipe", recipe,
                     "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2",
                     "--num-layers-at-end-in-bf16", "0")
    tf_config = models.transformer_config(config, torch.bfloat16)
    assert (tf_config.fp8, tf_config.fp8_recipe, tf_config.first_last_layers_bf16,
            tf_config.num_layers_at_start_in_bf16, tf_config.num_layers_at_end_in_bf16) == (
        "e4m3", recipe, True, 2, 0)
    assert (tf_config.fp8_margin, tf_config.fp8_amax_history_len,
            tf_config.fp8_amax_compute_algo) == (0, 1, "most_recent")  # Megatron's defaults


def test_the_fp8_reference_takes_the_students_recipe_in_a_config_of_its_own(te_present):
    config = _config("--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise",
                     "--reference-precision", "fp8", "--reference-fp8-weights")
    student = models.transformer_config(config, torch.bfloat16)
    reference = models.transformer_config(config, torch.bfloat16, initialize=False, frozen=True)
    assert reference is not student
    fields = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo",
              "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")
    assert {f: getattr(reference, f) for f in fields} == {f: getattr(student, f) for f in fields}
    assert reference.fp8 == "hybrid" and reference.fp8_recipe == "tensorwise"
    assert reference.fp8_param and not student.fp8_param  # FP8 weights: the reference's alone
    without_weights = _config(*FP8, "--reference-precision", "fp8")
    assert not models.transformer_config(without_weights, torch.bfloat16, frozen=True).fp8_param


def test_a_config_stored_before_the_precision_section_loads_without_fp8():
    config = from_container({"training": {"bf16": True}, "model": {"num_layers": 2}})
    assert config.precision.fp8_format is None and config.precision.reference_precision == "bf16"
    assert te.fp8_requested(config) == []


# ---------------------------------------------------------------------------------------------
# Refusals of the config


@pytest.mark.parametrize("flags,message", [
    (["--fp8-format", "hybrid"], r"precision.fp8_format \(--fp8-format\)=hybrid needs "
                                 r"training.bf16 \(--bf16\)"),
    (["--bf16", "--fp8-recipe", "tensorwise"], r"precision.fp8_recipe .*applies to FP8 runs "
                                               r"only: set precision.fp8_format"),
    (["--bf16", "--reference-precision", "fp8"], r"reference_precision.*=fp8 applies to FP8 "
                                                 r"runs only"),
    (["--bf16", "--fp8-param-gather"], r"fp8_param_gather.*applies to FP8 runs only"),
    ([*FP8, "--fp8-format", "fp8"], r"precision.fp8_format \(--fp8-format\) must be one of "
                                    r"e4m3, hybrid; got 'fp8'"),
    ([*FP8, "--fp8-recipe", "custom"], r"must be one of delayed, tensorwise, blockwise, mxfp8"),
    ([*FP8, "--fp8-amax-compute-algo", "mean"], r"must be one of most_recent, max"),
    ([*FP8, "--reference-precision", "fp16"], r"must be one of bf16, fp8"),
    ([*FP8, "--fp8-amax-history-len", "0"], r"fp8_amax_history_len.* must be positive"),
    ([*FP8, "--fp8-margin", "-1"], r"fp8_margin.* must be >= 0"),
    ([*FP8, "--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "1024"],
     r"fp8_amax_history_len.* applies to precision.fp8_recipe \(--fp8-recipe\)=delayed only, "
     r"not tensorwise"),
    ([*FP8, "--first-last-layers-bf16"], r"first_last_layers_bf16.* is not available with "
                                         r"precision.fp8_recipe \(--fp8-recipe\)=delayed"),
    ([*FP8, "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
      "--num-layers-at-end-in-bf16", "-1"], r"num_layers_at_end_in_bf16.* must be >= 0"),
    ([*FP8, "--fp8-param-gather"], r"fp8_param_gather \(--fp8-param-gather\) needs "
                                   r"parallel.use_distributed_optimizer"),
    ([*FP8, "--fp8-recipe", "tensorwise", "--reference-fp8-weights"],
     r"reference_fp8_weights.* needs precision.reference_precision "
     r"\(--reference-precision\)=fp8"),
    ([*FP8, "--reference-precision", "fp8", "--reference-fp8-weights"],
     r"reference_fp8_weights.* is not available with precision.fp8_recipe.*=delayed"),
])
def test_fp8_settings_that_cannot_work_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        _config(*flags)


def test_an_fp8_request_with_several_problems_names_them_all_at_once(te_missing, capsys):
    """FP8 without --bf16, FP8 weights without the distributed optimizer and bf16 edge layers
    with delayed scaling, where Transformer Engine is missing: one error names all four (each
    as it is named alone), the missing Transformer Engine through the refusal the run applies
    at its start. The planner, which needs no Transformer Engine, names the other three."""
    from megatron_gift.commands.plan import main as plan_main

    flags = ["--vocab-size", "64", "--fp8-format", "hybrid", "--fp8-param-gather",
             "--first-last-layers-bf16"]
    named = [r"precision.fp8_format \(--fp8-format\)=hybrid needs training.bf16 \(--bf16\)",
             r"fp8_param_gather \(--fp8-param-gather\) needs parallel.use_distributed_optimizer",
             r"first_last_layers_bf16.* is not available with precision.fp8_recipe "
             r"\(--fp8-recipe\)=delayed",
             r"--fp8-format hybrid needs Transformer Engine"]
    with pytest.raises(ConfigError) as refused:
        parse_config(flags, defaults=TINY, refusals=[te.refuse_fp8_without_te])
    message = str(refused.value)
    assert message.startswith("4 problems: ") and "\n" not in message
    for pattern in named:
        assert re.search(rf"\(\d\) [^;]*{pattern}", message), (pattern, message)
    with pytest.raises(ConfigError, match=r"^3 problems: ") as refused:
        parse_config(flags, defaults=TINY)
    assert "Transformer Engine" not in str(refused.value)
    with pytest.raises(SystemExit) as stopped:
        plan_main(flags)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: 3 problems: ")
    assert len(err.strip().splitlines()) == 1 and "Transformer Engine" not in err


def test_a_runs_command_line_names_config_and_machine_problems_in_one_error(te_missing,
                                                                            tmp_path):
    """What a run parses (``job_config``) adds this machine's refusals to a config refused
    anyway: FP8 without --bf16 and without Transformer Engine, and the distributed optimizer
    and CP=2 on a CPU, named at once; the machine's problems alone are one error too."""
    from megatron_gift.engine.job import job_config
    from megatron_gift.engine.run_spec import refuse_what_this_machine_cannot_run

    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "1+1=", "response": "2"}\n')
    flags = ["--train-path", str(demos), "--fp8-format", "hybrid", "--use-distributed-optimizer",
             "--context-parallel-size", "2", "--seq-length", "32"]
    with pytest.raises(ConfigError, match=r"^5 problems: \(1\) precision.fp8_format .*needs "
                                          r"training.bf16.*; \(2\) .*needs Transformer Engine.*; "
                                          r"\(3\) parallel.use_distributed_optimizer needs CUDA"
                                          r".*; \(4\) parallel.context_parallel_size=2 needs.*; "
                                          r"\(5\) world size 1 is not divisible"):
        job_config(flags)
    config = parse_config([*flags, "--bf16"])  # the config alone is sound
    with pytest.raises(UserError, match=r"^4 problems: \(1\) .*Transformer Engine.*; \(2\) "
                                        r"parallel.use_distributed_optimizer needs CUDA.*; \(3\) "
                                        r"parallel.context_parallel_size=2 needs"):
        refuse_what_this_machine_cannot_run(config)


def test_bf16_edge_layers_must_fit_in_a_pipeline_stage():
    from megatron_gift.config import check_layer_split

    flags = [*FP8, "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
             "--pipeline-model-parallel-size", "2"]
    check_layer_split(_config(*flags, "--num-layers-at-start-in-bf16", "2"))
    with pytest.raises(ConfigError, match=r"num_layers_at_start_in_bf16 "
                                          r"\(--num-layers-at-start-in-bf16\)=3 exceeds the 2 "
                                          r"layers of a pipeline stage"):
        check_layer_split(_config(*flags, "--num-layers-at-start-in-bf16", "3"))


# ---------------------------------------------------------------------------------------------
# Transformer Engine: the probe, and the refusals where it is missing


@pytest.mark.parametrize("error", [ImportError, OSError, RuntimeError])
def test_a_transformer_engine_that_fails_to_import_counts_as_missing(monkeypatch, error):
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise error(f"{name}: simulated failure (e.g. 0 active drivers)")
        return real_import(name, *args, **kwargs)

    te.available.cache_clear()
    monkeypatch.setattr(builtins, "__import__", failing)
    try:
        assert te.available() is False
    finally:
        monkeypatch.undo()
        te.available.cache_clear()


def test_transformer_engine_is_missing_on_this_machine():
    assert not te.available()  # the CPU image these tests run on


@pytest.mark.parametrize("flags,named", [
    (FP8, "--fp8-format hybrid"),
    ([*FP8, "--reference-precision", "fp8"], "--fp8-format hybrid, --reference-precision fp8"),
])
def test_fp8_is_refused_without_transformer_engine(te_missing, flags, named):
    config = _config(*flags)
    with pytest.raises(UserError, match=f"{named} needs Transformer Engine"):
        te.refuse_fp8_without_te(config)


def test_with_transformer_engine_fp8_is_not_refused(te_present):
    te.refuse_fp8_without_te(_config(*FP8, "--reference-precision", "fp8"))
    te.refuse_fp8_without_te(_config("--bf16"))


def test_a_run_without_fp8_is_not_refused_without_transformer_engine(te_missing):
    te.refuse_fp8_without_te(_config("--bf16"))


def test_training_refuses_fp8_before_anything_is_written(te_missing, tmp_path):
    from megatron_gift.engine.trainer import train

    save = tmp_path / "run"
    config = _config(*FP8, "--save", str(save), "--train-path", str(tmp_path / "absent.jsonl"))
    with pytest.raises(UserError, match="--fp8-format hybrid needs Transformer Engine"):
        train(config)
    assert not save.exists()


def test_the_default_job_refuses_fp8_before_preparing_its_files(te_missing, monkeypatch):
    from megatron_gift.demo import default_run
    from megatron_gift.engine import job

    def prepare(run_dir):
        raise AssertionError("the default job's files were prepared")

    monkeypatch.setattr(default_run, "prepare", prepare)
    with pytest.raises(UserError, match="needs Transformer Engine"):
        job.job_config([*FP8], default_job=default_run)


def test_the_fp8_recipe_parses_here_and_is_refused_at_the_start_naming_te(te_missing):
    config = parse_config(["--config", os.path.join(REPO, "examples", "recipes",
                                                    "llama3.1-8b-gift-fp8.yaml")])
    assert config.precision.fp8_format == "hybrid" and config.training.bf16
    with pytest.raises(UserError, match="needs Transformer Engine"):
        te.refuse_fp8_without_te(config)


# ---------------------------------------------------------------------------------------------
# FP8 really in use once the models are built


class _FakeTELayer(torch.nn.Linear):
    """Stands for one of Megatron-Core's TE layers (only its module path is read)."""


_FakeTELayer.__module__ = "megatron.core.extensions.transformer_engine"


def test_fp8_with_layers_that_are_not_transformer_engines_is_refused(te_present, world_of_one):
    """Megatron-Core would run such a model without FP8: the run stops instead."""
    config = _config(*FP8)
    tf_config = models.transformer_config(config, torch.bfloat16)
    chunks = models.build_chunks(config, tf_config, 128, torch.device("cpu"), local_spec=True)
    with pytest.raises(UserError, match=r"the student was asked to run in FP8 \(hybrid, delayed\) "
                                        r"but was built without Transformer Engine's layers"):
        te.check_fp8_in_use(tf_config, chunks, "student")
    chunks[0].decoder.layers[0].add_module("fake", _FakeTELayer(2, 2))
    te.check_fp8_in_use(tf_config, chunks, "student")
    plain = models.transformer_config(_config("--bf16"), torch.bfloat16)
    te.check_fp8_in_use(plain, [torch.nn.Linear(2, 2)], "student")  # no FP8 asked: no check


def test_the_precision_line_names_recipe_weights_and_reference(te_present):
    config = _config("--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise",
                     "--first-last-layers-bf16", "--reference-precision", "fp8",
                     "--reference-fp8-weights")
    student = models.transformer_config(config, torch.bfloat16)
    reference = models.transformer_config(config, torch.bfloat16, frozen=True)
    assert te.describe(student, reference) == (
        "FP8 hybrid (tensorwise scaling, first 1 and last 1 layers bf16), reference FP8 with "
        "FP8 weights")
    bf16_reference = models.transformer_config(_config(*FP8), torch.bfloat16, frozen=True)
    assert te.describe(models.transformer_config(_config(*FP8), torch.bfloat16),
                       bf16_reference) == "FP8 hybrid (delayed scaling), reference bf16"
    assert te.describe(models.transformer_config(_config("--bf16"), torch.bfloat16)) == "no FP8"
