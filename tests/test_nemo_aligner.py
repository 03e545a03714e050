"""The NeMo-Aligner hand-off: the NeMo 1.x model directory, the actor config, and (slow) the
export loaded by Megatron-Core 0.10 under torch 2.4 in a separate environment."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from megatron_gift.rl import nemo_aligner
from support import old_stack  # at collection: its cache outlives the session (old_stack.py)

pytestmark = pytest.mark.system  # the converter and the NeMo-Aligner era stack, as programs

TESTS = os.path.dirname(os.path.abspath(__file__))
TOKENS = [1, 5, 9, 12, 3, 7, 30, 2]


def _run(*argv):
    """The finished command (its stdout, stderr); warning filters are not inherited."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tiny_hf(path, family):
    """A random 2-layer model of ``family`` over the bundled tokenizer (fp32)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_gift.demo import synthetic

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    if family == "qwen2":  # QKV bias, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:  # untied, Llama-3.1 RoPE scaling (factor 8)
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def export(request, tmp_path_factory):
    """``(save root, export dir, the hand-off command's result, family)``: a converted tiny
    model and its NeMo-Aligner export."""
    root = tmp_path_factory.mktemp(request.param)
    _tiny_hf(root / "hf", request.param)
    _run("-m", "megatron_gift.convert", "hf-to-megatron", "--hf", root / "hf", "--out",
         root / "save", "--converter", "builtin")
    out = root / "aligner"
    handoff = _run("-m", "megatron_gift.rl_handoff", "nemo-aligner", "--checkpoint",
                   root / "save", "--out", out, "--tp", "2", "--num-nodes", "2", "--tar")
    return root / "save", out, handoff, request.param


def test_model_config_is_a_nemo_megatron_gpt_config(export):
    save, out, _, family = export
    cfg = OmegaConf.load(out / "model.nemo" / "model_config.yaml")
    assert cfg.mcore_gpt is True and cfg.transformer_engine is True
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
            cfg.num_query_groups, cfg.kv_channels) == (2, 64, 128, 4, 2, 16)
    assert (cfg.normalization, cfg.activation, cfg.bias) == ("rmsnorm", "fast-swiglu", False)
    assert cfg.qkv_bias is (family == "qwen2")
    assert cfg.share_embeddings_and_output_weights is (family == "qwen2")
    assert cfg.scale_positional_embedding is (family == "llama")
    assert cfg.seq_len_interpolation_factor is None and cfg.position_embedding_type == "rope"
    assert cfg.override_vocab_size == 128 and cfg.make_vocab_size_divisible_by == 128
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 1)
    assert (cfg.precision, cfg.megatron_amp_O2) == ("bf16", True)
    tokenizer = out / "model.nemo" / "tokenizer"
    assert cfg.tokenizer.library == "huggingface" and cfg.tokenizer.type == "nemo:tokenizer"
    assert (tokenizer / "tokenizer.json").is_file()
    assert not any(p.name.endswith(".safetensors") for p in tokenizer.iterdir())
    # Megatron-Core 0.10's reader: its metadata.json fields and a common.pt.
    weights = out / "model.nemo" / "model_weights"
    assert json.loads((weights / "metadata.json").read_text()) == nemo_aligner.MCORE_010_METADATA
    assert (weights / "common.pt").is_file() and (weights / ".metadata").is_file()
    import tarfile

    with tarfile.open(out / "model.nemo.tar") as archive:
        names = archive.getnames()
    assert "./model_config.yaml" in names and "./model_weights/common.pt" in names


def test_weights_carry_the_model_prefix_and_te_extra_states(export):
    _, out, _, family = export
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(out / "model.nemo" / "model_weights")).read_metadata()
               .state_dict_metadata)
    tensors = {k for k in keys if "/shard_" not in k}
    expected = {"model.embedding.word_embeddings.weight", "model.decoder.final_layernorm.weight",
                "model.decoder.layers.self_attention.linear_qkv.weight",
                "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                "model.decoder.layers.self_attention.linear_proj.weight",
                "model.decoder.layers.mlp.linear_fc1.weight",
                "model.decoder.layers.mlp.linear_fc1.layer_norm_weight",
                "model.decoder.layers.mlp.linear_fc2.weight"}
    if family == "qwen2":
        expected.add("model.decoder.layers.self_attention.linear_qkv.bias")
    else:
        expected.add("model.output_layer.weight")
    assert tensors == expected
    for module in nemo_aligner.TE_EXTRA_STATES:
        for i in range(2):
            assert f"model.decoder.layers.{module}._extra_state/shard_{i}_2" in keys


def test_actor_config_overrides_the_recipe(export):
    _, out, handoff, _ = export
    printed = handoff.stdout
    actor = OmegaConf.load(out / "reinforce.yaml")
    assert list(actor.defaults) == ["gpt_reinforce_actor", "_self_"]
    assert actor.hydra.searchpath == ["file:///opt/NeMo-Aligner/examples/nlp/gpt/conf"]
    # Hydra puts _self_ last: these keys win over the recipe's (a stand-in with its keys).
    recipe = OmegaConf.create({
        "trainer": {"num_nodes": 8, "devices": 8, "reinforce": {
            "initial_policy_kl_penalty": 0.01, "num_rollouts_per_prompt": 4}},
        "pretrained_checkpoint": {"restore_from_path": None},
        "remote_rm": {"reward_model": {"ip": "localhost", "port": 5555}},
        "model": {"global_batch_size": 64, "optim": {"lr": 9e-7, "sched": {"min_lr": 9e-8}},
                  "reinforce": {"num_rollout_samples": 512}}})
    merged = OmegaConf.merge(recipe, {k: v for k, v in actor.items()
                                      if k not in ("defaults", "hydra")})
    assert merged.pretrained_checkpoint.restore_from_path == str(out / "model.nemo")
    assert merged.trainer.reinforce.num_rollouts_per_prompt == 8
    assert merged.trainer.reinforce.initial_policy_kl_penalty == 0
    assert merged.model.optim.lr == 1e-6 and merged.model.optim.sched.min_lr < 1e-6
    assert (merged.model.tensor_model_parallel_size, merged.trainer.num_nodes) == (2, 2)
    assert merged.model.global_batch_size == 512 and merged.model.reinforce.num_rollout_samples == 128
    # Aligner merges the actor's model section over model_config.yaml
    # (nemo_aligner/utils/utils.py :: load_and_override_model_config).
    model = OmegaConf.merge(OmegaConf.load(out / "model.nemo" / "model_config.yaml"),
                            merged.model)
    assert model.tensor_model_parallel_size == 2 and model.num_layers == 2
    sbatch = (out / "reinforce.sbatch").read_text()
    assert "#SBATCH hetjob" in sbatch and "--het-group=0" in sbatch and "--het-group=1" in sbatch
    assert "serve_reward_model.py" in sbatch and "remote_rm.reward_model.ip=${SERVER_HOST}" in sbatch
    assert f"--config-path={out} --config-name=reinforce" in sbatch
    assert f"sbatch {out}/reinforce.sbatch" in printed
    assert "train_gpt_reinforce_actor.py" in printed


def test_model_config_names_the_tokenizer_inside_the_archive(export):
    """No path of the machine that wrote it; ``nemo:tokenizer`` is packed in the directory and
    the archive, and the actor config points NeMo's ``AutoTokenizer`` at it."""
    from transformers import AutoTokenizer

    save, out, _, _ = export
    model_dir = out / "model.nemo"
    text = (model_dir / "model_config.yaml").read_text()
    for path in {str(out), str(save), str(save.parent), os.path.expanduser("~"), os.getcwd()}:
        assert path not in text
    values = OmegaConf.to_container(OmegaConf.load(model_dir / "model_config.yaml"))
    strings = []
    _strings(values, strings)
    assert [v for v in strings if v.startswith("/")] == []
    named = values["tokenizer"]["type"]
    assert named.startswith("nemo:")
    packed = model_dir / named[len("nemo:"):]
    assert (packed / "tokenizer.json").is_file() and (packed / "tokenizer_config.json").is_file()
    import tarfile

    with tarfile.open(out / "model.nemo.tar") as archive:
        assert f"./{named[len('nemo:'):]}/tokenizer.json" in archive.getnames()
    # Aligner merges the actor's model section over model_config.yaml.
    merged = OmegaConf.merge(values, OmegaConf.load(out / "reinforce.yaml").model)
    assert merged.tokenizer.type == str(packed) and merged.tokenizer.library == "huggingface"
    loaded = AutoTokenizer.from_pretrained(merged.tokenizer.type,
                                           use_fast=merged.tokenizer.use_fast)
    source = AutoTokenizer.from_pretrained(save / "hf")
    assert loaded.get_vocab() == source.get_vocab()
    assert loaded("Q: 1 + 2 = ?")["input_ids"] == source("Q: 1 + 2 = ?")["input_ids"]


def _strings(value, found):
    if isinstance(value, dict):
        for item in value.values():
            _strings(item, found)
    elif isinstance(value, list):
        for item in value:
            _strings(item, found)
    elif isinstance(value, str):
        found.append(value)


def test_handoff_prints_no_upstream_warnings(export):
    """The command filters the known Transformer Engine/Apex/deprecation noise while it builds
    and saves the model (as the training launcher does)."""
    from megatron_gift.platform import console

    _, _, handoff, _ = export
    noise = [p for p, _ in console.KNOWN_WARNINGS] + list(console.QUIET_MESSAGES)
    assert [p for p in noise if p in handoff.stderr] == [], handoff.stderr[-3000:]


def test_ppo_writes_the_ppo_actor(export, tmp_path):
    save, _, _, family = export
    if family != "llama":
        pytest.skip("one family is enough")
    lines = nemo_aligner.write_nemo_aligner(str(save), None, str(tmp_path), "ppo")
    actor = OmegaConf.load(tmp_path / "ppo_actor.yaml")
    assert actor.defaults[0] == "gpt_ppo_actor" and actor.trainer.ppo.initial_policy_kl_penalty == 0
    assert actor.remote_critic_rm.critic.port == nemo_aligner.CRITIC_PORT
    assert "serve_ppo_critic.py" in (tmp_path / "ppo.sbatch").read_text()
    assert "train_gpt_ppo_actor.py" in lines[1]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="--algorithm 'grpo'"):
        nemo_aligner.write_nemo_aligner(str(tmp_path), None, str(tmp_path / "o"), "grpo")
    with pytest.raises(ValueError, match=re.escape("--tp x --pp = 3 does not divide")):
        nemo_aligner.write_nemo_aligner(str(tmp_path), None, str(tmp_path / "o"), tp=3)
    with pytest.raises(FileNotFoundError, match=f"--checkpoint {tmp_path}: no Megatron"):
        nemo_aligner.write_nemo_aligner(str(tmp_path), None, str(tmp_path / "o"))
    qwen3 = OmegaConf.create({"family": "qwen3", "qk_layernorm": True, "num_layers": 2})
    with pytest.raises(ValueError, match="model.family=qwen3 has per-head query/key norms "
                                         r"\(qk_layernorm\).*use the NeMo RL hand-off"):
        nemo_aligner.nemo_model_config(qwen3, 128, "/tok", 1, 1, 64)
    model = OmegaConf.create({"rope_scaling_factor": 32.0, "num_layers": 2})
    with pytest.raises(ValueError, match="rope_scaling_factor=32.0: NeMo 1.x applies"):
        nemo_aligner.nemo_model_config(model, 128, "/tok", 1, 1, 64)
    model = OmegaConf.create({"rope_scaling_factor": None, "num_layers": 3,
                              "num_attention_heads": 4, "num_query_groups": 2})
    with pytest.raises(ValueError, match="--pp 2 does not divide the model's 3 layers"):
        nemo_aligner.nemo_model_config(model, 128, "/tok", 1, 2, 64)
    model.num_layers = 2
    with pytest.raises(ValueError, match="--tp 4 does not divide the model's num_query_groups=2"):
        nemo_aligner.nemo_model_config(model, 128, "/tok", 4, 1, 64)
    assert not (tmp_path / "o").exists()


def _source(save):
    """The source checkpoint as this project loads it: ``({name: tensor}, logits [1, s, V])``."""
    from megatron_gift.config import from_container
    from megatron_gift.core import checkpoint
    from megatron_gift.core import model as models
    from megatron_gift.platform.distributed import world_of_one

    directory = checkpoint.latest_checkpoint(str(save))
    config = from_container(checkpoint.run_facts(directory)["config"])
    with world_of_one():
        tf_config = models.transformer_config(config, torch.float32, initialize=False)
        vocab = models.padded_vocab_size(config.model.vocab_size, config)
        model = models.build_chunks(config, tf_config, vocab, torch.device("cpu"),
                                    local_spec=True)[0]
        checkpoint.load_model_weights(str(save), [model],
                                      checkpoint.architecture(config.model, vocab))
        model.eval()
        tokens = torch.tensor([TOKENS])
        seq = tokens.size(1)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).view(1, 1, seq, seq)
        with torch.no_grad():
            logits = model(tokens, torch.arange(seq).unsqueeze(0), mask)
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
    return state, logits


@pytest.mark.slow
def test_megatron_core_0_10_on_torch_2_4_loads_the_export(export, tmp_path):
    """NeMo's restore path on Aligner's stack: weights equal the source, logits match."""
    from support.parallel_harness import free_port

    save, out, _, family = export
    python = old_stack.python()
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"tokens": TOKENS, "dtype": "float32"}))
    result = subprocess.run(
        [python, os.path.join(TESTS, "support", "old_stack_load_nemo.py"), out / "model.nemo", request,
         tmp_path / "loaded.pt"], capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "PORT": str(free_port()), "HOME": os.environ["HOME"]})
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert loaded["versions"]["torch"].startswith("2.4.0")
    assert loaded["versions"]["megatron.core"] == "0.10.0"
    state, logits = _source(save)
    assert set(loaded["state"]) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded["state"][name], tensor), name
    torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=1e-5)
    # Every TE extra state the TE layer spec asks for is there, as "no FP8 state".
    core = loaded["extra_states"]["self_attention.core_attention"]
    assert core == ["None", "None"]
    assert sum(k.endswith("linear_qkv._extra_state") for k in loaded["extra_states"]) == 2
    assert set(v for k, v in loaded["extra_states"].items() if k.startswith("model.")) == {"None"}
