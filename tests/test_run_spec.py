"""The run settled once (``engine/run_spec.resolve``): a run owns its directory, a copy or a
branch never writes into the original, nothing is overwritten, and what the run reads is
fingerprinted. Resolution needs no process group, so most checks run in this process against
one small finished run; the end-to-end checks launch the real command."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_gift.engine.job import job_config
from megatron_gift.engine.run_spec import resolve
from megatron_gift.errors import ConfigError, UserError
from support.parallel_harness import TINY_MODEL, train_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(world, base, **checkpoint):
    return {"model": dict(TINY_MODEL),
            "data": {"train_path": world["demos"]},
            "training": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 4},
            "optimizer": {"lr": 1e-2, "lr_decay_style": "constant"},
            "gift": {"beta": 3.0},
            "checkpoint": {"pretrained_checkpoint": str(base), **checkpoint},
            "logging": {"progress": False}}


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory):
    """A GIFT run of 2 iterations, checkpoints at 1 and 2, from a private copy of the base."""
    root = tmp_path_factory.mktemp("run_spec")
    shutil.copytree(tiny_world["base"], root / "base")
    train_here(_overrides(tiny_world, root / "base", save=str(root / "run"), save_interval=1))
    return root


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run (and its base) that a test may change."""
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def _resolve(argv):
    return resolve(job_config([str(a) for a in argv]))


def _files(directory):
    """Every file under ``directory`` with its size and modification time."""
    return {os.path.join(d, n): (os.path.getsize(os.path.join(d, n)),
                                 os.path.getmtime(os.path.join(d, n)))
            for d, _, names in os.walk(directory) for n in names}


def test_a_copied_or_moved_run_resumes_into_itself(run, tmp_path):
    copy = tmp_path / "copyA"
    shutil.copytree(run, copy)
    run.rename(tmp_path / "movedB")
    spec = _resolve(["--load", copy, "--train-iters", "4", "--override-opt-param-scheduler"])
    assert spec.save == str(copy) and spec.resume_from == str(copy / "iter_0000002")
    assert spec.config.logging.metrics_file == str(copy / "metrics.jsonl")
    assert spec.config.logging.tensorboard_dir == str(copy / "tensorboard")
    assert not (tmp_path / "run").exists()


def test_a_branch_writes_only_into_its_own_directory(run, tmp_path):
    branch = tmp_path / "branch"
    spec = _resolve(["--load", run, "--save", branch, "--train-iters", "4",
                     "--override-opt-param-scheduler"])
    assert spec.resume_from == str(run / "iter_0000002") and spec.save == str(branch)
    for path in (spec.config.logging.metrics_file, spec.config.logging.tensorboard_dir):
        assert path.startswith(str(branch) + os.sep)


def test_a_checkpoint_records_no_place_outside_itself(run):
    """Where a run writes is not in its saved config: a resume from any working directory
    writes where the checkpoint lies."""
    from megatron_gift.core.checkpoint import run_facts

    config = run_facts(str(run / "iter_0000002"))["config"]
    assert config["checkpoint"]["save"] is None and config["checkpoint"]["load"] is None
    assert config["logging"]["metrics_file"] == "metrics.jsonl"
    assert config["logging"]["tensorboard_dir"] == "tensorboard"


def test_a_relative_save_resumed_from_another_directory_stays_one_run(run, tmp_path,
                                                                      monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = _resolve(["--load", os.path.relpath(run), "--train-iters", "4",
                     "--override-opt-param-scheduler"])
    assert spec.save == str(run) and spec.config.logging.metrics_file == str(run / "metrics.jsonl")


def test_a_new_run_into_a_runs_save_directory_is_refused(run, tiny_world, finished):
    argv = ["--config", _recipe(run.parent, tiny_world, finished / "base"), "--save", run]
    with pytest.raises(UserError, match=f"--save {run} holds the checkpoints of another run: "
                                        f"pass --load {run} to continue"):
        _resolve(argv)


def _recipe(directory, world, base):
    path = directory / "recipe.yaml"
    overrides = _overrides(world, base)
    path.write_text(json.dumps(overrides))  # JSON is YAML
    return path


def test_a_lost_tracker_resumes_from_the_newest_complete_checkpoint_or_names_it(run):
    os.remove(run / "latest_checkpointed_iteration.txt")
    os.remove(run / "iter_0000002" / ".metadata")  # its save never finished
    with pytest.raises(UserError, match=f"--load {run}: no latest_checkpointed_iteration.txt "
                                        f"there, but {run}/iter_0000001 is its newest complete"):
        _resolve(["--load", run])
    spec = _resolve(["--load", run, "--save", run])  # the requeue idiom
    assert spec.resume_from == str(run / "iter_0000001") and spec.start_iteration == 1


def test_a_resume_whose_base_changed_is_refused_naming_it(run, tmp_path, finished):
    base = tmp_path / "base"
    shutil.copytree(finished / "base", base)
    spec = _resolve(["--load", run, "--reference-load", base])  # the same weights elsewhere
    assert spec.reference_source == str(base)
    with open(base / "iter_0000008" / "metadata.json", "a") as f:
        f.write(" ")  # a checkpoint written again in place
    with pytest.raises(UserError, match=f"what the run started from has changed since: "
                                        f"reference {base} \\(fingerprint"):
        _resolve(["--load", run, "--reference-load", base])


def test_a_resume_whose_tokenizer_changed_is_refused(run, tmp_path):
    tokenizer = _tokenizer_with_two_tokens_swapped(tmp_path / "tokenizer")
    with pytest.raises(UserError, match=f"tokenizer {tokenizer} \\(fingerprint"):
        _resolve(["--load", run, "--tokenizer", tokenizer])


def _tokenizer_with_two_tokens_swapped(directory):
    """The bundled tokenizer, saved to ``directory`` with the ids of two tokens exchanged:
    the same size and shape, other token ids."""
    from transformers import AutoTokenizer

    from megatron_gift.demo import synthetic

    AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR).save_pretrained(directory)
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = "1", "2"  # digits: every demonstration uses them
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    return directory


def test_a_reference_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, monkeypatch):
    from test_hf_conversion import make_hf_model

    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "student", "llama")
    make_hf_model(tmp_path / "reference", "llama")
    _tokenizer_with_two_tokens_swapped(tmp_path / "reference")
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "1+1=", "response": "2"}\n')
    argv = ["--pretrained-checkpoint", tmp_path / "student", "--reference-load",
            tmp_path / "reference", "--train-path", demos, "--seq-length", "32",
            "--save", tmp_path / "gift"]
    with pytest.raises(UserError, match=f"the reference {tmp_path / 'reference'} has another "
                                        "tokenizer than the student's"):
        _resolve(argv)
    make_hf_model(tmp_path / "reference", "llama", seed=1)  # the student's tokenizer again
    assert _resolve(argv).reference_source == str(tmp_path / "reference")
    assert not (tmp_path / "gift").exists()


@pytest.mark.parametrize("flag,value,expected", [
    ("--num-layers", "3", "model.num_layers=3 \\(--num-layers\\) contradicts the base model's 2"),
    ("--seq-length", "20000", "model.seq_length=20000 \\(--seq-length\\) exceeds the base "
                              "model's max_position_embeddings=16384"),
])
def test_a_model_setting_an_hf_base_contradicts_is_refused(tmp_path, monkeypatch, flag, value,
                                                           expected):
    from test_hf_conversion import make_hf_model

    monkeypatch.setenv("MEGATRON_GIFT_CACHE", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "hf", "llama")
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "1+1=", "response": "2"}\n')
    argv = ["--pretrained-checkpoint", tmp_path / "hf", "--train-path", demos]
    with pytest.raises(ConfigError, match=expected):
        _resolve([*argv, flag, value])
    spec = _resolve([*argv, "--seq-length", "32"])  # the base's architecture, taken whole
    assert spec.config.model.num_layers == 2 and spec.config.model.hidden_size == 64


def test_tensorboard_and_metrics_default_into_the_save_directory(tiny_world, tmp_path, finished):
    spec = _resolve(["--config", _recipe(tmp_path, tiny_world, finished / "base"),
                     "--save", tmp_path / "new"])
    assert spec.config.logging.tensorboard_dir == str(tmp_path / "new" / "tensorboard")
    assert spec.config.logging.metrics_file == str(tmp_path / "new" / "metrics.jsonl")
    assert not (tmp_path / "new").exists()  # resolving writes nothing


def test_resuming_a_finished_run_says_so_and_writes_nothing(run, capfd):
    from megatron_gift.engine.trainer import train

    before = _files(run)
    assert train(job_config(["--load", str(run)])) == 2
    assert _files(run) == before
    out, err = capfd.readouterr()
    assert f"the run in {run} already finished: iteration 2 of 2; nothing to do" in out + err


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(run, damage):
    shard = run / "iter_0000002" / "__0_0.distcp"
    if damage == "truncated":
        os.truncate(shard, 100)
    else:
        os.remove(shard)
    what = "is truncated \\(100 of" if damage == "truncated" else "is missing"
    with pytest.raises(UserError, match=f"checkpoint {run}/iter_0000002 is damaged: "
                                        f"iter_0000002/__0_0.distcp {what}.*the newest intact one "
                                        f"is {run}/iter_0000001: resume from it with --load "
                                        f"{run}/iter_0000001"):
        _resolve(["--load", run])
    spec = _resolve(["--load", run / "iter_0000001", "--train-iters", "3",
                     "--override-opt-param-scheduler"])  # the way forward it names
    assert spec.start_iteration == 1 and spec.save == str(run)


@pytest.mark.parametrize("place", ["file", "read-only", "read-only cache"])
def test_a_save_directory_or_cache_that_cannot_be_written_is_named(tiny_world, tmp_path,
                                                                   finished, place):
    """/sys refuses new files even to root (permissions alone would not tell)."""
    save, cache = tmp_path / "new", tmp_path / "cache"
    if place == "file":
        save.write_text("")
    elif place == "read-only":
        save = "/sys/megatron_gift_run"
    else:
        cache = "/sys/megatron_gift_cache"
    expected = {"file": f"--save {save} is a file, not a directory: give another --save",
                "read-only": f"--save {save} cannot be written \\(Permission denied\\)",
                "read-only cache": f"the data cache {cache} cannot be written \\(Permission "
                                   "denied\\): set --cache-dir or MEGATRON_GIFT_CACHE"}[place]
    with pytest.raises(UserError, match=expected):
        _resolve(["--config", _recipe(tmp_path, tiny_world, finished / "base"), "--save", save,
                  "--cache-dir", cache])


@pytest.mark.system
@pytest.mark.slow
def test_a_copy_resumed_from_another_directory_leaves_the_original_alone(run, tmp_path):
    """End to end, as a user types it: the copy trains on, the original keeps its files."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = _files(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "pretrain_gift.py"), "--load",
         os.path.relpath(copy, elsewhere), "--train-iters", "3",
         "--override-opt-param-scheduler"], cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"writes checkpoints {copy}, metrics {copy}/metrics.jsonl" in result.stdout + \
        result.stderr
    assert (copy / "iter_0000003").is_dir() and _files(run) == before
    assert not any(elsewhere.iterdir())
    with open(copy / "metrics.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]


def test_inspect_shows_the_checkpoint_a_resume_would_take_and_its_fingerprints(run):
    from megatron_gift.commands.inspect_checkpoint import as_text, describe

    os.remove(run / "latest_checkpointed_iteration.txt")
    facts = describe(str(run))
    assert facts["directory"] == str(run / "iter_0000002") and facts["iteration"] == 2
    assert set(facts["fingerprints"]) == {"base", "reference", "tokenizer", "vocab"}
    assert "fingerprints      base " in as_text(facts)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.1 MB tmpfs: room for one checkpoint of the tiny run, not two (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.system  # mount(8)
def test_a_full_disk_is_one_line_and_the_tracker_keeps_the_last_complete_checkpoint(
        tiny_world, finished, small_disk):
    save = small_disk / "run"
    overrides = _overrides(tiny_world, finished / "base", save=str(save), save_interval=1)
    with pytest.raises(Exception, match=f"saving iteration 2 to {save} failed: the file system "
                                        f"is full .*the newest complete checkpoint is still "
                                        f"{save}/iter_0000001: free the space and resume with "
                                        f"--load {save}"):
        train_here(overrides)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_a_checkpoint_from_before_query_key_norms_loads_as_one_without_them(monkeypatch):
    """Checkpoints written before ``qk_layernorm`` was recorded had none: they load into a
    model without query/key norms and are refused, naming it, by one with them."""
    from megatron_gift.core import checkpoint
    from megatron_gift.errors import UserError

    older = {k: 1 for k in checkpoint.ARCHITECTURE_KEYS if k != "qk_layernorm"}
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda path: path)
    monkeypatch.setattr(checkpoint, "run_facts", lambda directory: {"architecture": older})
    monkeypatch.setattr(checkpoint, "_load_tensors", lambda state, directory: {})
    assert checkpoint.load_model_weights("old", [], {**older, "qk_layernorm": False}) == {}
    with pytest.raises(UserError, match="qk_layernorm: checkpoint False vs run True"):
        checkpoint.load_model_weights("old", [], {**older, "qk_layernorm": True})
