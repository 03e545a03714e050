"""Hand a GIFT run to NeMo-Aligner 0.7 (REINFORCE or PPO): a NeMo 1.x model directory and the
actor config over it.

::

    python -m megatron_gift.rl_handoff nemo-aligner --checkpoint SAVE [--hf HF_DIR] --out DIR
        [--algorithm reinforce|ppo] [--tp 4 --pp 1 --num-nodes 1 --gpus-per-node 8] [--tar]

writes::

    DIR/model.nemo/model_config.yaml   NeMo 1.x MegatronGPTModel config (mcore_gpt: True)
    DIR/model.nemo/model_weights/      model-only dist checkpoint, keys ``model.`` + Megatron-Core
                                       names, readable by Megatron-Core 0.10 and torch 2.4
    DIR/model.nemo/tokenizer/          the HF tokenizer files (tokenizer.library: huggingface,
                                       named ``nemo:tokenizer``: a path inside the archive)
    DIR/model.nemo.tar                 with --tar: the same as a ``.nemo`` file
    DIR/reinforce.yaml | ppo_actor.yaml  the actor config: Aligner's recipe + this run
    DIR/reinforce.sbatch | ppo.sbatch  the heterogeneous SLURM job of Aligner's docs

What NeMo-Aligner 0.7.0 (Dockerfile: NeMo 633cb60 = v2.1.0, Megatron-LM core_r0.10.0, the
``pytorch:24.07`` container's torch 2.4) reads, and so what is written:

* ``nemo_aligner/utils/utils.py`` (``load_from_nemo``): a directory is restored as an extracted
  ``.nemo``; ``load_and_override_model_config`` merges the recipe's ``model:`` over
  ``model_config.yaml`` (so the recipe's sequence length, batch sizes and optimizer win, and the
  architecture, tokenizer and TP/PP written here stay unless the recipe names them).
* NeMo ``MegatronBaseModel._build_tokenizer``: ``tokenizer.model``, ``vocab_file`` and
  ``merge_file`` go through ``register_artifact``, which reads ``nemo:NAME`` as NAME inside the
  restored archive or directory (``SaveRestoreConnector.register_artifact``); ``tokenizer.type``
  goes to ``transformers.AutoTokenizer.from_pretrained`` as it is. ``model_config.yaml`` names
  the packed tokenizer ``nemo:tokenizer`` (no path of the machine that wrote it), and the actor
  config sets ``model.tokenizer.type`` to that directory where the job finds it, which Aligner
  merges over ``model_config.yaml``. Restoring the archive elsewhere: set
  ``model.tokenizer.type`` to its ``tokenizer/`` the same way.
* NeMo ``NLPSaveRestoreConnector.restore_from`` (``nlp_overrides.py``): ``model_weights/`` must
  be a directory; it is loaded with ``MegatronGPTModel.sharded_state_dict()``, whose keys are
  ``model.`` + the ``GPTModel`` keys (``megatron_gpt_model.py``), through
  ``DistributedCheckpointIO.load_checkpoint`` with ``StrictHandling.ASSUME_OK_UNEXPECTED``:
  checkpoint keys the model does not ask for are ignored, keys it asks for must be there.
  Aligner's model uses Transformer Engine layers, which also ask for one ``_extra_state``
  object per TE module and layer (:data:`TE_EXTRA_STATES`): written as ``None``, which TE's
  ``set_extra_state`` takes as "no FP8 state".
* ``MegatronGPTModel.model_provider_func`` / ``build_transformer_config``: the model keys of
  :func:`nemo_model_config` (``bias``, ``qkv_bias``, ``activation``, ``normalization``,
  ``override_vocab_size``, ``scale_positional_embedding``, ...). NeMo applies Llama-3.1 RoPE
  scaling with factor 8 only (``nemo/collections/common/parts/utils.py: apply_rope_scaling``),
  so a run with another factor is refused.
* Megatron-Core 0.10 ``dist_checkpointing.load`` reads ``metadata.json`` into
  ``CheckpointingConfig(**json)`` (unknown keys fail) and the common state from ``common.pt``,
  which Megatron-Core 0.19 no longer writes: both are written here in 0.10's form. The tensors
  and objects are saved by torch's DCP writer of this stack; ``tests/test_nemo_aligner.py``
  loads them with Megatron-Core 0.10 under torch 2.4.
"""

import json
import os
import shutil
import tarfile
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from megatron_gift.core.paths import latest_checkpoint
from megatron_gift.errors import MissingFileError, UserError
from megatron_gift.hf.architecture import check_tokenizer_files
from megatron_gift.rl.handoff import hf_dir_beside, top_level

# algorithm -> (Aligner recipe under examples/nlp/gpt/conf, file written, Aligner script)
ALGORITHMS = {
    "reinforce": ("gpt_reinforce_actor", "reinforce.yaml", "train_gpt_reinforce_actor.py"),
    "ppo": ("gpt_ppo_actor", "ppo_actor.yaml", "train_gpt_ppo_actor.py"),
}
ALIGNER_DIR = "/opt/NeMo-Aligner"  # where Aligner's Dockerfile clones it
# A NeMo Framework container with Aligner under /opt (which release carries Aligner 0.7 was not
# checked: pass --container, e.g. an image built from Aligner v0.7.0's Dockerfile).
CONTAINER = "nvcr.io/nvidia/nemo:24.12"
MODEL_DIR = "model.nemo"
TOKENIZER_DIR = "tokenizer"  # inside MODEL_DIR
TOKENIZER_REF = f"nemo:{TOKENIZER_DIR}"  # how model_config.yaml names it
# Transformer Engine modules of Megatron-Core 0.10's TE layer spec whose state dict holds an
# ``_extra_state`` (FP8 metadata), per decoder layer.
TE_EXTRA_STATES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                   "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2")
NEMO_ROPE_SCALING_FACTOR = 8.0
# Megatron-Core 0.10's metadata.json (dist_checkpointing/core.py :: CheckpointingConfig).
MCORE_010_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                      "common_backend": "torch", "common_backend_version": 1}
REWARD_PORT = 5555
CRITIC_PORT = 5556


def nemo_model_config(model: Any, padded_vocab: int, tokenizer: str, tp: int, pp: int,
                      seq_length: int) -> dict[str, Any]:
    """The NeMo 1.x ``MegatronGPTModel`` config (``model_config.yaml``) of a run's model section.

    ``model``: the run's ``model`` config section; ``padded_vocab``: the embedding rows of the
    export (NeMo builds exactly these through ``override_vocab_size``); ``tokenizer``: the HF
    tokenizer directory as the config names it (``TOKENIZER_REF``, inside the archive);
    ``tp``/``pp``: the layout Aligner starts with;
    ``seq_length``: tokens (``encoder_seq_length``, ``max_position_embeddings``).
    Raises UserError for RoPE scaling NeMo 1.x cannot express and for Qwen3's query/key norms.
    """
    if model.get("qk_layernorm"):
        raise UserError(
            f"model.family={model.get('family')} has per-head query/key norms (qk_layernorm), which this "
            "NeMo-Aligner export does not write or check; use the NeMo RL hand-off (nemo-rl)")
    factor = model.rope_scaling_factor
    if factor and float(factor) != NEMO_ROPE_SCALING_FACTOR:
        raise UserError(
            f"model.rope_scaling_factor={factor}: NeMo 1.x applies Llama-3.1 RoPE scaling with "
            f"factor {NEMO_ROPE_SCALING_FACTOR:g} only (scale_positional_embedding); use the "
            "NeMo RL hand-off (nemo-rl) for this model")
    if model.num_layers % pp:
        raise UserError(f"--pp {pp} does not divide the model's {model.num_layers} layers")
    for name, value in (("num_attention_heads", model.num_attention_heads),
                        ("num_query_groups", model.num_query_groups)):
        if value % tp:
            raise UserError(f"--tp {tp} does not divide the model's {name}={value}")
    divisible = 128
    while padded_vocab % divisible:
        divisible //= 2
    return {
        "mcore_gpt": True,
        "transformer_engine": True,
        "micro_batch_size": 1,
        "global_batch_size": 8,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": seq_length,
        "max_position_embeddings": seq_length,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "kv_channels": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "init_method_std": model.init_method_std,
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "apply_query_key_layer_scaling": False,
        "normalization": "rmsnorm",
        "layernorm_epsilon": model.norm_epsilon,
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": divisible,
        "override_vocab_size": padded_vocab,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": False,
        "qkv_bias": bool(model.add_qkv_bias),
        "activation": "fast-swiglu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "normalize_attention_scores": True,
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "rotary_base": float(model.rotary_base),
        "seq_len_interpolation_factor": None,
        "scale_positional_embedding": bool(factor),
        "attention_type": "multihead",
        "share_embeddings_and_output_weights": not model.untie_embeddings_and_output_weights,
        "tokenizer": {"library": "huggingface", "type": tokenizer, "model": None,
                      "vocab_file": None, "merge_file": None, "delimiter": None,
                      "sentencepiece_legacy": False, "use_fast": True},
        "precision": "bf16",
        "megatron_amp_O2": True,
        "bias_activation_fusion": True,
        "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": True,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "use_cpu_initialization": False,
        "sequence_parallel": False,
        "seed": 1234,
        "data": {"data_prefix": None, "index_mapping_dir": None, "seq_length": seq_length},
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "nemo_version": "2.1.0",
    }


def actor_config(algorithm: str, restore_path: str, aligner_dir: str, results_dir: str,
                 tp: int, pp: int, num_nodes: int, gpus_per_node: int) -> dict[str, Any]:
    """The actor YAML for ``algorithm`` (reinforce | ppo): Hydra composes Aligner's recipe
    (found through ``hydra.searchpath`` = ``<aligner_dir>/examples/nlp/gpt/conf``) and then
    these keys over it (``_self_`` last).

    RL settings after the GIFT paper's GRPO stage: group size 8 (REINFORCE's rollouts per
    prompt), KL penalty 0, constant learning rate 1e-6, 128 prompts per step and updates of 64
    prompts. The reward (REINFORCE) or the critic + reward (PPO) is a PyTriton server Aligner
    queries at ``remote_rm`` / ``remote_critic_rm``; the SLURM job passes its host. The
    tokenizer is the export's (``restore_path``/tokenizer, which ``model_config.yaml`` names
    ``nemo:tokenizer``).
    """
    recipe = ALGORITHMS[algorithm][0]
    group = 8 if algorithm == "reinforce" else 1
    prompts, update_prompts = 128, 64
    rl = {"initial_policy_kl_penalty": 0.0, "max_epochs": 1}
    model: dict[str, Any] = {
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "global_batch_size": update_prompts * group, "micro_batch_size": 1,
        # NeMo's CosineAnnealing needs min_lr < lr; this keeps the rate at 1e-6 throughout.
        "optim": {"lr": 1.0e-6, "sched": {"warmup_steps": 0, "min_lr": 0.999e-6}},
        "tokenizer": {"type": os.path.join(restore_path, TOKENIZER_DIR)},
        algorithm: {"num_rollout_samples": prompts,
                    "sampling_params": {"temperature": 1.0, "top_k": 0, "top_p": 1.0}},
    }
    if algorithm == "reinforce":
        rl["num_rollouts_per_prompt"] = group
        remote = {"remote_rm": {"reward_model": {"ip": "localhost", "port": REWARD_PORT}}}
    else:
        remote = {"remote_critic_rm": {"combine_rm_and_critic_server": True,
                                       "critic": {"ip": "localhost", "port": CRITIC_PORT}}}
    return {
        "defaults": [recipe, "_self_"],
        "hydra": {"searchpath": [f"file://{aligner_dir}/examples/nlp/gpt/conf"]},
        "pretrained_checkpoint": {"restore_from_path": restore_path},
        "trainer": {"num_nodes": num_nodes, "devices": gpus_per_node, algorithm: rl},
        "exp_manager": {"explicit_log_dir": results_dir},
        "model": model,
        **remote,
    }


def write_nemo_aligner(checkpoint: str, hf_dir: Optional[str], out: str,
                       algorithm: str = "reinforce", tp: int = 1, pp: int = 1,
                       num_nodes: int = 1, gpus_per_node: int = 8, reward_nodes: int = 1,
                       aligner_dir: str = ALIGNER_DIR, container: str = CONTAINER,
                       tar: bool = False) -> list[str]:
    """Export the newest checkpoint under ``checkpoint`` for NeMo-Aligner into ``out``; returns
    the lines that start the run (the sbatch line, then the actor's command).

    ``hf_dir``: the run's HF export or base (tokenizer files), default ``checkpoint/hf``;
    ``tp``/``pp``: the actor's layout (``num_nodes`` x ``gpus_per_node`` GPUs for the actor,
    ``reward_nodes`` more for the reward or critic server); ``aligner_dir``: NeMo-Aligner's
    checkout inside ``container``; ``tar``: also write ``model.nemo.tar``.
    """
    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    for flag, value in (("--tp", tp), ("--pp", pp), ("--num-nodes", num_nodes),
                        ("--gpus-per-node", gpus_per_node), ("--reward-nodes", reward_nodes)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if (num_nodes * gpus_per_node) % (tp * pp):
        raise UserError(f"--tp x --pp = {tp * pp} does not divide the actor's "
                        f"{num_nodes * gpus_per_node} GPUs (--num-nodes {num_nodes} x "
                        f"--gpus-per-node {gpus_per_node})")
    directory = latest_checkpoint(checkpoint)
    if directory is None:
        raise MissingFileError(f"--checkpoint {checkpoint}: no Megatron checkpoint (no "
                                "latest_checkpointed_iteration.txt or metadata.json)")
    from megatron_gift.core import checkpoint as ckpt

    if (ckpt.run_facts(directory).get("config") or {}).get("lora", {}).get("rank"):
        raise UserError(
            f"{directory} is a LoRA run: hand off the merged model, 'megatron-gift convert "
            f"megatron-to-hf --load {checkpoint} --out MERGED' then 'megatron-gift convert "
            "hf-to-megatron --hf MERGED --out CKPT', and pass --checkpoint CKPT")
    hf_dir = hf_dir_beside(checkpoint, hf_dir, "HF tokenizer")
    check_tokenizer_files(hf_dir)
    out = os.path.abspath(out)
    model_dir = os.path.join(out, MODEL_DIR)
    tokenizer_dir = os.path.join(model_dir, TOKENIZER_DIR)
    export_model(directory, model_dir, hf_dir, tp, pp)
    if tar:
        with tarfile.open(model_dir + ".tar", "w") as archive:
            for name in sorted(os.listdir(model_dir)):
                archive.add(os.path.join(model_dir, name), arcname=f"./{name}")
    _, yaml_name, script = ALGORITHMS[algorithm]
    results = os.path.join(out, f"{algorithm}_results")
    actor = actor_config(algorithm, model_dir, aligner_dir, results, tp, pp, num_nodes,
                         gpus_per_node)
    OmegaConf.save(OmegaConf.create(actor), os.path.join(out, yaml_name))
    sbatch = os.path.join(out, f"{algorithm}.sbatch")
    with open(sbatch, "w") as f:
        f.write(slurm_script(algorithm, out, yaml_name, script, aligner_dir, container,
                             num_nodes, gpus_per_node, reward_nodes,
                             top_level([out, os.path.abspath(checkpoint), tokenizer_dir])))
    return [f"sbatch {sbatch}",
            f"cd {aligner_dir} && python -u examples/nlp/gpt/{script} --config-path {out} "
            f"--config-name {yaml_name[:-5]}"]


def export_model(directory: str, model_dir: str, hf_dir: str, tp: int, pp: int) -> dict:
    """Write ``model_dir`` (``model_config.yaml``, ``model_weights/``, ``tokenizer/``) from the
    iteration ``directory``; returns the model config written."""
    import torch

    from megatron_gift.config import from_container
    from megatron_gift.core import checkpoint as ckpt
    from megatron_gift.core import model as models
    from megatron_gift.platform.distributed import world_of_one

    run = ckpt.run_facts(directory)
    config = from_container(run["config"])
    dtype = torch.bfloat16 if config.training.bf16 else torch.float32
    config.parallel.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                           virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
                           context_parallel_size=1)
    seq_length = _max_positions(hf_dir, config.model.seq_length)
    weights = os.path.join(model_dir, "model_weights")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    os.makedirs(model_dir)
    _copy_tokenizer(hf_dir, os.path.join(model_dir, TOKENIZER_DIR))
    with world_of_one():
        tf_config = models.transformer_config(config, dtype, initialize=False)
        tf_config.use_cpu_initialization = True
        vocab = models.padded_vocab_size(config.model.vocab_size, config)
        model = models.build_chunks(config, tf_config, vocab, torch.device("cpu"),
                                    local_spec=True)[0]
        nemo = nemo_model_config(config.model, vocab, TOKENIZER_REF, tp, pp, seq_length)
        ckpt.load_model_weights(directory, [model],
                                ckpt.architecture(config.model, model.vocab_size))
        save_model_weights(model, weights)
    OmegaConf.save(OmegaConf.create(nemo), os.path.join(model_dir, "model_config.yaml"))
    return nemo


def save_model_weights(model: Any, weights_dir: str) -> None:
    """Save ``model`` (a TP=1, PP=1 ``GPTModel``) as NeMo's ``model_weights/``: keys ``model.``
    + Megatron-Core's, the TE ``_extra_state`` objects of every layer, and Megatron-Core 0.10's
    ``metadata.json`` and ``common.pt``. Needs the one-process world of the caller."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = model.sharded_state_dict(prefix="model.")
    present = {value.key for value in state.values()}
    layers = model.config.num_layers
    # Megatron-Core 0.19's local linear layers carry these objects already (value None);
    # its local core attention does not.
    for module in TE_EXTRA_STATES:
        key = f"model.decoder.layers.{module}._extra_state"
        if key not in present:
            for i in range(layers):
                state[f"te_extra_state.{key}.{i}"] = ShardedObject(key, None, (layers,), (i,),
                                                                   replica_id=0)
    os.makedirs(weights_dir)
    dist_checkpointing.save({"state_dict": state}, weights_dir)
    with open(os.path.join(weights_dir, "metadata.json"), "w") as f:
        json.dump(MCORE_010_METADATA, f)
    # Megatron-Core 0.10 reads the non-sharded state from here: none in a model-only save.
    torch.save({"state_dict": {}}, os.path.join(weights_dir, "common.pt"))


def slurm_script(algorithm: str, out: str, yaml_name: str, script: str, aligner_dir: str,
                 container: str, num_nodes: int, gpus_per_node: int, reward_nodes: int,
                 mounts: Sequence[str]) -> str:
    """The heterogeneous sbatch job of Aligner's docs: group 0 serves the reward model
    (REINFORCE) or the critic with the reward model (PPO), group 1 trains the actor."""
    if algorithm == "reinforce":
        server = ("examples/nlp/gpt/serve_reward_model.py --config-path=examples/nlp/gpt/conf "
                  "--config-name=inference_rm rm_model_file=${RM_NEMO_FILE} "
                  f"inference.port={REWARD_PORT}")
        remote = (f"remote_rm.reward_model.ip=${{SERVER_HOST}} "
                  f"remote_rm.reward_model.port={REWARD_PORT}")
        what = "reward model (or a verifier behind the same PyTriton interface)"
    else:
        server = ("examples/nlp/gpt/serve_ppo_critic.py --config-path=examples/nlp/gpt/conf "
                  "--config-name=gpt_ppo_critic pretrained_checkpoint.restore_from_path="
                  f"${{RM_NEMO_FILE}} inference.port={CRITIC_PORT}")
        remote = f"remote_critic_rm.critic.ip=${{SERVER_HOST}} remote_critic_rm.critic.port={CRITIC_PORT}"
        what = "critic initialised from the reward model"
    mount_arg = ",".join(f"{m}:{m}" for m in mounts)
    return f"""#!/bin/bash
#SBATCH -N {reward_nodes} --ntasks-per-node 1 --gpus-per-node {gpus_per_node} -A ACCOUNT -p PARTITION -t 4:00:00 --exclusive --job-name gift_{algorithm}
#SBATCH hetjob
#SBATCH -N {num_nodes} --ntasks-per-node {gpus_per_node} --gpus-per-node {gpus_per_node} -A ACCOUNT -p PARTITION -t 4:00:00 --exclusive --job-name gift_{algorithm}
# Group 0: the {what}; group 1: the actor, started from {out}/{MODEL_DIR}.
# Set RM_NEMO_FILE (and its mount) and the data in {out}/{yaml_name} (model.data.data_prefix).
set -eu
RM_NEMO_FILE=${{RM_NEMO_FILE:?set RM_NEMO_FILE to the reward model .nemo}}
CONTAINER={container}
MOUNTS="--container-mounts={mount_arg}"
SERVER_HOST="$(scontrol show hostnames=$SLURM_JOB_NODELIST_HET_GROUP_0 | head -n1)"
mkdir -p {out}/{algorithm}_results
srun --het-group=0 -o {out}/{algorithm}_results/server_%j.log --container-image=$CONTAINER $MOUNTS \\
    bash -c "cd {aligner_dir} && export PYTHONPATH={aligner_dir}:\\$PYTHONPATH && python -u {server} trainer.num_nodes={reward_nodes} trainer.devices={gpus_per_node}" &
sleep 30
srun --mpi=pmix --het-group=1 -o {out}/{algorithm}_results/actor_%j_%t.log --container-image=$CONTAINER $MOUNTS \\
    bash -c "cd {aligner_dir} && export PYTHONPATH={aligner_dir}:\\$PYTHONPATH && python -u examples/nlp/gpt/{script} --config-path={out} --config-name={yaml_name[:-5]} {remote}" &
wait
"""


def _copy_tokenizer(hf_dir: str, target: str) -> None:
    """The tokenizer files of ``hf_dir`` (and its config.json, which AutoTokenizer may need to
    find the tokenizer class), no weights."""
    from megatron_gift.hf.convert import WEIGHT_SUFFIXES

    os.makedirs(target)
    for name in os.listdir(hf_dir):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES):
            shutil.copy(path, target)


def _max_positions(hf_dir: str, seq_length: int) -> int:
    """Tokens the model is built for: the HF config's ``max_position_embeddings`` when there is
    one, else the run's sequence length."""
    path = os.path.join(hf_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("max_position_embeddings") or seq_length)
    return seq_length
