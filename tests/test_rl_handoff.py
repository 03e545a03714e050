"""The hand-off to RL: the NeMo RL GRPO config, and a real GRPO run with TRL on CPU."""

import argparse
import importlib.util
import os
import random
import re

import pytest
import torch
from omegaconf import OmegaConf

from megatron_gift.demo import synthetic
from megatron_gift import rl_handoff as rl_handoff_command
from megatron_gift.rl import handoff as rl_handoff

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_torch_dist(directory, common):
    """A one-tensor torch_dist checkpoint in ``directory`` with ``common`` as its common state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_gift.platform.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    os.makedirs(directory)
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0)), **common}
    dist_checkpointing.save(state, directory)


@pytest.fixture
def megatron_lm_root(tmp_path, world_of_one):
    """A Megatron-LM-layout root: tracker + iter_0000012 (torch_dist, with Megatron-LM args)."""
    root = tmp_path / "gift"
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    _save_torch_dist(str(root / "iter_0000012"), {"args": args, "iteration": 12})
    (root / "latest_checkpointed_iteration.txt").write_text("12")
    return root


@pytest.fixture
def nemo_rl_dir(tmp_path):
    """A NeMo RL checkout stand-in holding the recipes the config may inherit."""
    configs = tmp_path / "RL" / "examples" / "configs"
    configs.mkdir(parents=True)
    for name in rl_handoff.BASE_CONFIGS:
        (configs / name).write_text("policy:\n  megatron_cfg:\n    pipeline_model_parallel_size: 2\n")
    return tmp_path / "RL"


def _tiny_llama(seed=0):
    """A random 2-layer Llama (hidden 64) over the bundled tokenizer, saved with it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    return model, tokenizer


@pytest.fixture
def hf_dir(tmp_path):
    model, tokenizer = _tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path, **options):
    out = tmp_path / "handoff" / "grpo_gift.yaml"
    lines = rl_handoff.write_nemo_rl_config(str(megatron_lm_root), str(hf_dir), str(nemo_rl_dir),
                                           str(out), **options)
    return OmegaConf.load(out), lines


def test_nemo_rl_config_has_the_keys_nemo_rl_reads(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path):
    config, lines = _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path,
                           base_config="grpo_math_70B_megatron.yaml", num_nodes=8, tp=4, pp=4)
    base = nemo_rl_dir / "examples" / "configs" / "grpo_math_70B_megatron.yaml"
    assert config.defaults == str(base) and os.path.isabs(config.defaults)
    assert config.policy.model_name == config.policy.tokenizer.name == str(hf_dir)
    assert dict(config.checkpointing.pretrained_checkpoint) == {"format": "megatron_lm",
                                                                "path": str(megatron_lm_root)}
    assert config.policy.megatron_cfg.enabled is True and config.policy.dtensor_cfg.enabled is False
    assert (config.policy.megatron_cfg.tensor_model_parallel_size,
            config.policy.megatron_cfg.pipeline_model_parallel_size) == (4, 4)
    assert config.checkpointing.enabled is True
    assert config.checkpointing.checkpoint_dir == str(tmp_path / "handoff" / "grpo_checkpoints")
    assert (config.cluster.num_nodes, config.cluster.gpus_per_node) == (8, 8)
    # Merged over its base the way NeMo RL does, the overrides win.
    merged = OmegaConf.merge(OmegaConf.load(config.defaults), config)
    assert merged.policy.megatron_cfg.pipeline_model_parallel_size == 4
    out = tmp_path / "handoff" / "grpo_gift.yaml"
    assert lines[0].endswith(f"uv run ./examples/run_grpo.py --config {out}")
    assert "sbatch --nodes=8 --gres=gpu:8" in lines[1] and lines[1].endswith("ray.sub")
    mounts = re.search(r'MOUNTS="([^"]*)"', lines[1]).group(1).split(",")
    for path in (nemo_rl_dir, megatron_lm_root, hf_dir, out.parent):
        assert f"{path}:{path}" in mounts


def test_expert_parallel_sizes_go_to_megatron_cfg_for_moe_models(megatron_lm_root, hf_dir,
                                                                  nemo_rl_dir, tmp_path):
    config, _ = _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path, num_nodes=2, tp=2, ep=8,
                       etp=1)
    megatron = config.policy.megatron_cfg
    assert (megatron.tensor_model_parallel_size, megatron.expert_model_parallel_size,
            megatron.expert_tensor_parallel_size) == (2, 8, 1)
    with pytest.raises(ValueError, match="etp \\* ep \\* pp = 24 does not divide the 16 GPUs"):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path, num_nodes=2, ep=8, etp=3)


def test_parallel_sizes_default_to_the_recipe(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path):
    config, _ = _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path)
    assert config.defaults.endswith("grpo_math_8B_megatron.yaml")
    assert set(config.policy.megatron_cfg) == {"enabled"}
    merged = OmegaConf.merge(OmegaConf.load(config.defaults), config)
    assert merged.policy.megatron_cfg.pipeline_model_parallel_size == 2


def test_cli_writes_the_config_and_prints_the_launch_lines(megatron_lm_root, hf_dir, nemo_rl_dir,
                                                           tmp_path, capsys):
    out = tmp_path / "cli.yaml"
    rl_handoff_command.main(["nemo-rl", "--checkpoint", str(megatron_lm_root), "--hf", str(hf_dir),
                     "--nemo-rl-dir", str(nemo_rl_dir), "--out", str(out), "--num-nodes", "2"])
    printed = capsys.readouterr().out
    assert OmegaConf.load(out).cluster.num_nodes == 2
    assert f"--config {out}" in printed and "sbatch --nodes=2 --gres=gpu:8" in printed


@pytest.mark.parametrize("breakage, named", [
    (lambda root: (root / "latest_checkpointed_iteration.txt").unlink(), "{root}: not a Megatron-LM"),
    (lambda root: (root / "latest_checkpointed_iteration.txt").write_text("13"), "iter_0000013"),
    (lambda root: (root / "iter_0000012" / "metadata.json").unlink(), "iter_0000012: no metadata"),
])
def test_bad_checkpoint_is_named_and_nothing_is_written(megatron_lm_root, hf_dir, nemo_rl_dir,
                                                        tmp_path, breakage, named):
    breakage(megatron_lm_root)
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(named.format(root=megatron_lm_root))):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path)
    assert not (tmp_path / "handoff" / "grpo_gift.yaml").exists()


def test_checkpoint_without_megatron_lm_args_is_refused(tmp_path, hf_dir, nemo_rl_dir, world_of_one):
    root = tmp_path / "no_args"
    _save_torch_dist(str(root / "iter_0000003"), {"iteration": 3})
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(ValueError, match=re.escape(f"{root}/iter_0000003: the common state has no 'args'")):
        _write(root, hf_dir, nemo_rl_dir, tmp_path)


def test_bad_layout_base_config_and_hf_dir_are_named(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path):
    with pytest.raises(ValueError, match="tp \\* pp = 3 does not divide the 8 GPUs"):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path, tp=3)
    with pytest.raises(FileNotFoundError, match="grpo_math_9B_megatron.yaml: no such NeMo RL config"):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path,
               base_config="grpo_math_9B_megatron.yaml")
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{hf_dir}: no tokenizer file"):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path)
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{hf_dir}: no config.json"):
        _write(megatron_lm_root, hf_dir, nemo_rl_dir, tmp_path)
    assert not (tmp_path / "handoff" / "grpo_gift.yaml").exists()


def _grpo_script():
    path = os.path.join(REPO, "examples", "rl", "grpo_trl.py")
    spec = importlib.util.spec_from_file_location("grpo_trl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _memorize(model, tokenizer, texts, steps=40, lr=3e-3):
    """Fit ``model`` to ``texts`` (prompt + solution), so its samples are right some of the time."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    length = max(map(len, ids))
    batch = torch.tensor([i + [tokenizer.pad_token_id] * (length - len(i)) for i in ids])
    labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=batch, attention_mask=(batch != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_trl_grpo_rewards_sampled_answers_and_updates_the_model(tmp_path):
    grpo = _grpo_script()
    data = grpo.synthetic_dataset(4, seed=0)
    rng = random.Random(0)
    problems = [synthetic.problem(rng) for _ in range(4)]
    assert data["prompt"] == [prompt for prompt, _ in problems]
    model, tokenizer = _tiny_llama()
    _memorize(model, tokenizer, [f"{p} {responses['stepwise']}" for p, responses in problems])
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    calls = []

    def reward(prompts, completions, answer, **kwargs):
        rewards = grpo.arithmetic_reward(completions, answer)
        calls.append((prompts, completions, answer, rewards))
        return rewards

    steps, prompts_per_step, generations = 3, 2, 4
    trainer = grpo.build_trainer(str(tmp_path / "hf"), data, reward, str(tmp_path / "out"), steps,
                                 prompts_per_step, generations, max_completion_length=24,
                                 learning_rate=1e-3)
    trainer.train()

    assert len(calls) == steps
    truth = {row["prompt"]: row["answer"] for row in data}
    logged = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    all_rewards = []
    for (prompts, completions, answer, rewards), mean in zip(calls, logged):
        assert len(completions) == prompts_per_step * generations
        assert all(isinstance(c, str) for c in completions)  # one may be eos at once: ""
        assert any(c.strip() for c in completions)
        for prompt, completion, ref, r in zip(prompts, completions, answer, rewards):
            assert ref == truth[prompt]
            stated = re.findall(r"A:\s*([-\d ]+)\s*$", completion)
            assert r == float(bool(stated) and stated[-1].replace(" ", "") == ref)
        assert mean == pytest.approx(sum(rewards) / len(rewards))
        all_rewards += rewards
    assert set(all_rewards) == {0.0, 1.0}
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_math_reward_checks_equivalence_and_file_fields_are_named(tmp_path):
    grpo = _grpo_script()
    assert grpo.math_reward([r"so $x = \frac{1}{2}$", "it is 3"], ["0.5", "4"]) == [1.0, 0.0]
    path = tmp_path / "math.jsonl"
    path.write_text('{"problem": "1+1?", "solution": "2"}\n')
    with pytest.raises(ValueError, match=f"--data {path}: no field \\['answer'\\]"):
        grpo.file_dataset(str(path), "problem", "answer")
    assert grpo.file_dataset(str(path), "problem", "solution")[0] == {"prompt": "1+1?", "answer": "2"}


@pytest.mark.system
@pytest.mark.slow
def test_the_default_jobs_gift_checkpoint_goes_to_nemo_rl_and_trains_with_trl(tmp_path, nemo_rl_dir):
    """The embedded default (stage 1, then 4 GIFT iterations), exported, handed to NeMo RL's
    config writer and trained for two GRPO steps with TRL, each as a user would run it."""
    import json
    import subprocess
    import sys

    def run(*argv):
        result = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(os.path.join(REPO, "examples", "pretrain_gift.py"), "--train-iters", "4", "--no-progress")
    gift = tmp_path / "runs" / "default" / "gift"
    run("-m", "megatron_gift.convert", "megatron-to-hf", "--load", gift, "--out", tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        hf_config = json.load(f)
    tokenizer = synthetic_tokenizer()
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)
    run("-m", "megatron_gift.rl_handoff", "nemo-rl", "--checkpoint", gift, "--hf", tmp_path / "hf",
        "--nemo-rl-dir", nemo_rl_dir, "--out", tmp_path / "grpo.yaml")
    config = OmegaConf.load(tmp_path / "grpo.yaml")
    assert config.checkpointing.pretrained_checkpoint.path == str(gift)
    out = run(os.path.join(REPO, "examples", "rl", "grpo_trl.py"), "--model", tmp_path / "hf",
              "--output-dir", tmp_path / "grpo", "--steps", "2")
    rewards = [float(r) for r in re.findall(r"step \d+: mean reward ([0-9.]+)", out)]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    assert (tmp_path / "grpo" / "config.json").exists()


def synthetic_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)


def test_hf_dir_defaults_to_the_assets_beside_the_checkpoint(megatron_lm_root, hf_dir, nemo_rl_dir,
                                                             tmp_path):
    with pytest.raises(FileNotFoundError, match="megatron-to-hf --load"):
        rl_handoff.write_nemo_rl_config(str(megatron_lm_root), None, str(nemo_rl_dir),
                                        str(tmp_path / "a.yaml"))
    import shutil

    shutil.copytree(hf_dir, megatron_lm_root / "hf")
    rl_handoff.write_nemo_rl_config(str(megatron_lm_root), None, str(nemo_rl_dir),
                                    str(tmp_path / "b.yaml"))
    config = OmegaConf.load(tmp_path / "b.yaml")
    assert config.policy.model_name == str(megatron_lm_root / "hf") == config.policy.tokenizer.name
