"""Hand a GIFT run to the RL stage: a NeMo RL GRPO config that starts from the GIFT checkpoint.

::

    python -m megatron_gift.rl_handoff nemo-rl --checkpoint SAVE --hf HF_DIR \\
        --nemo-rl-dir /path/to/RL --out grpo_gift.yaml [--base-config grpo_math_8B_megatron.yaml]
        [--tp 4 --pp 4 --ep 8 --num-nodes 8 --gpus-per-node 8 --checkpoint-dir DIR]

The YAML inherits one of NeMo RL's Megatron GRPO recipes (``defaults:``) and overrides only
what ties it to this run::

    defaults                                        <nemo-rl-dir>/examples/configs/<base-config>
    policy.model_name, policy.tokenizer.name        HF_DIR (architecture + tokenizer)
    checkpointing.pretrained_checkpoint             {format: megatron_lm, path: SAVE}
    policy.megatron_cfg.enabled / dtensor_cfg       Megatron backend on, DTensor off
    policy.megatron_cfg.{tensor,pipeline}_model_parallel_size   only when given
    policy.megatron_cfg.expert_{model,tensor}_parallel_size     only when given (Qwen3-MoE)
    checkpointing.{enabled, checkpoint_dir}         where the RL run saves
    cluster.{num_nodes, gpus_per_node}

``HF_DIR`` needs ``config.json`` and the tokenizer, no weights: NeMo RL builds the Megatron
model from the HF config and loads the weights from ``SAVE``'s newest ``iter_*`` (torch_dist).

Every key was checked against NVIDIA-NeMo/RL at commit 7ea279a (2026-08-22), whose
Megatron-Bridge submodule is 8c46dc4:

* ``examples/configs/grpo_math_{1B,8B,70B}_megatron.yaml``: the keys above and their nesting;
* ``nemo_rl/utils/config.py`` (``load_config_with_inheritance``): a relative ``defaults`` path
  is resolved against the YAML's own directory, so it is written absolute;
* ``nemo_rl/algorithms/grpo.py`` (``setup``): copies ``checkpointing.pretrained_checkpoint``
  into the policy config;
* ``nemo_rl/models/megatron/setup.py`` (``validate_model_paths``, ``setup_model_config``): a
  ``megatron_lm`` root resolves through ``latest_checkpointed_iteration.txt`` to an iteration
  directory that must hold ``metadata.json``; the model config comes from ``policy.model_name``;
* Megatron-Bridge ``training/checkpointing.py`` (``_extract_megatron_lm_args_from_state_dict``):
  without ``run_config.yaml`` the checkpoint's common state must carry Megatron-LM's ``args``;
* ``examples/run_grpo.py`` (``--config``, ``key=value`` overrides) and ``ray.sub`` (``COMMAND``,
  ``CONTAINER``, ``MOUNTS``, run from the submit directory) for the launch lines.
"""

import os
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from megatron_gift.core.paths import TRACKER, iteration_dir
from megatron_gift.errors import MissingFileError, UserError
from megatron_gift.hf.architecture import ASSETS, check_tokenizer_files

BASE_CONFIGS = ("grpo_math_1B_megatron.yaml", "grpo_math_8B_megatron.yaml",
                "grpo_math_70B_megatron.yaml")
CONTAINER = "nvcr.io/nvidia/nemo-rl:latest"


def megatron_lm_iteration(root: str) -> str:
    """The iteration directory NeMo RL will load from a Megatron-LM checkpoint ``root``.

    Raises FileNotFoundError / ValueError naming the path when ``root`` lacks the tracker file,
    the tracked ``iter_*`` directory, its ``metadata.json`` (torch_dist) or the ``args`` entry
    Megatron-Bridge reads from the common state.
    """
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise MissingFileError(f"{root}: not a Megatron-LM checkpoint root (no {TRACKER})")
    with open(tracker) as f:
        value = f.read().strip()
    if not value.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found {value!r}")
    directory = iteration_dir(root, int(value))
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise MissingFileError(f"{directory}: no metadata.json (not a torch_dist checkpoint)")
    common = _common_state(directory)
    if (common.get("run") or {}).get("lora_base"):
        raise UserError(
            f"{directory} holds a LoRA run's adapters alone: hand off the merged model, "
            f"'megatron-gift convert megatron-to-hf --load {root} --out MERGED' then "
            "'megatron-gift convert hf-to-megatron --hf MERGED --out CKPT', and pass CKPT")
    if "args" not in common:
        raise UserError(
            f"{directory}: the common state has no 'args' entry; Megatron-Bridge's megatron_lm "
            "loader reads the TP/PP and save flags of Megatron-LM's arguments from it and stops "
            "without them")
    return directory


def check_hf_dir(path: str) -> None:
    """Raise FileNotFoundError naming ``path`` unless it holds config.json and a tokenizer."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"{path}: no config.json (expected a Hugging Face model directory)")
    check_tokenizer_files(path)


def check_layout(tp: Optional[int], pp: Optional[int], num_nodes: int,
                 gpus_per_node: int, ep: Optional[int] = None, etp: Optional[int] = None) -> None:
    """Raise ValueError unless the Megatron model-parallel group, and the experts' (expert-TP x
    EP x PP), tile the cluster's GPUs."""
    for name, value in (("num_nodes", num_nodes), ("gpus_per_node", gpus_per_node),
                        ("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    gpus, group = num_nodes * gpus_per_node, (tp or 1) * (pp or 1)
    if gpus % group:
        raise UserError(f"tp * pp = {group} does not divide the {gpus} GPUs "
                         f"({num_nodes} nodes x {gpus_per_node})")
    experts = (etp or tp or 1) * (ep or 1) * (pp or 1)
    if ep is not None and gpus % experts:
        raise UserError(f"etp * ep * pp = {experts} does not divide the {gpus} GPUs "
                         f"({num_nodes} nodes x {gpus_per_node})")


def nemo_rl_config(checkpoint: str, hf_dir: str, base_config: str, checkpoint_dir: str,
                   num_nodes: int, gpus_per_node: int, tp: Optional[int] = None,
                   pp: Optional[int] = None, ep: Optional[int] = None,
                   etp: Optional[int] = None) -> dict[str, Any]:
    """The GRPO config overrides as a plain dict (all paths as given; ``base_config`` absolute)."""
    megatron = {"enabled": True}
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if value is not None:
            megatron[key] = value
    return {
        "defaults": base_config,
        "policy": {"model_name": hf_dir, "tokenizer": {"name": hf_dir},
                   "dtensor_cfg": {"enabled": False}, "megatron_cfg": megatron},
        "checkpointing": {"enabled": True, "checkpoint_dir": checkpoint_dir,
                          "pretrained_checkpoint": {"format": "megatron_lm", "path": checkpoint}},
        "cluster": {"num_nodes": num_nodes, "gpus_per_node": gpus_per_node},
    }


def launch_lines(config_path: str, nemo_rl_dir: str, num_nodes: int, gpus_per_node: int,
                 mounts: Sequence[str], container: str) -> list[str]:
    """Shell lines that start GRPO with ``config_path``: one node, then SLURM via ray.sub."""
    command = f"uv run ./examples/run_grpo.py --config {config_path}"
    mount_arg = ",".join(f"{m}:{m}" for m in mounts)
    return [
        f"cd {nemo_rl_dir} && {command}",
        f"cd {nemo_rl_dir} && COMMAND=\"{command}\" CONTAINER={container} "
        f"MOUNTS=\"{mount_arg}\" GPUS_PER_NODE={gpus_per_node} "
        f"sbatch --nodes={num_nodes} --gres=gpu:{gpus_per_node} "
        "--account=ACCOUNT --partition=PARTITION --time=4:00:00 ray.sub",
    ]


def write_nemo_rl_config(checkpoint: str, hf_dir: Optional[str], nemo_rl_dir: str, out: str,
                         base_config: str = BASE_CONFIGS[1], checkpoint_dir: Optional[str] = None,
                         num_nodes: int = 1, gpus_per_node: int = 8, tp: Optional[int] = None,
                         pp: Optional[int] = None, container: str = CONTAINER,
                         ep: Optional[int] = None, etp: Optional[int] = None) -> list[str]:
    """Validate the inputs, write the NeMo RL GRPO YAML to ``out``; returns the launch lines.

    ``checkpoint``: the GIFT save root; ``hf_dir``: its HF export (config + tokenizer), by
    default ``checkpoint/hf`` (the base model's config and tokenizer that a run from a Hugging
    Face model keeps beside its checkpoints);
    ``nemo_rl_dir``: a NeMo RL checkout at the same path on the launch host and in the
    container; ``checkpoint_dir``: where RL checkpoints go (default ``<out dir>/grpo_checkpoints``).
    """
    hf_dir = hf_dir_beside(checkpoint, hf_dir, "HF config")
    checkpoint, hf_dir, nemo_rl_dir, out = (os.path.abspath(p) for p in
                                            (checkpoint, hf_dir, nemo_rl_dir, out))
    check_layout(tp, pp, num_nodes, gpus_per_node, ep, etp)
    check_hf_dir(hf_dir)
    base = os.path.join(nemo_rl_dir, "examples", "configs", base_config)
    if not os.path.isfile(base):
        raise MissingFileError(f"{base}: no such NeMo RL config (--nemo-rl-dir {nemo_rl_dir}, "
                                f"--base-config {base_config})")
    megatron_lm_iteration(checkpoint)
    out_dir = os.path.dirname(out)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_dir = os.path.abspath(checkpoint_dir or os.path.join(out_dir, "grpo_checkpoints"))
    config = nemo_rl_config(checkpoint, hf_dir, base, checkpoint_dir, num_nodes, gpus_per_node,
                            tp, pp, ep, etp)
    os.makedirs(checkpoint_dir, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), out)
    mounts = top_level([nemo_rl_dir, checkpoint, hf_dir, out_dir, checkpoint_dir])
    return launch_lines(out, nemo_rl_dir, num_nodes, gpus_per_node, mounts, container)


def hf_dir_beside(checkpoint: str, hf_dir: Optional[str], what: str) -> str:
    """``hf_dir``, or by default the HF assets a run keeps beside its checkpoints
    (``checkpoint/hf``); MissingFileError naming the export command when there are none.
    ``what``: what the caller reads from it, for the message (e.g. "HF tokenizer")."""
    if hf_dir is not None:
        return hf_dir
    hf_dir = os.path.join(checkpoint, ASSETS)
    if not os.path.isdir(hf_dir):
        raise MissingFileError(
            f"{hf_dir}: no {what} beside the checkpoint (the run did not start from a Hugging "
            f"Face model); export one with `python -m megatron_gift.convert megatron-to-hf "
            f"--load {checkpoint} --out HF_DIR` and pass --hf HF_DIR")
    return hf_dir


def top_level(paths: Sequence[str]) -> list[str]:
    """``paths`` (absolute) without those equal to or inside another one, in order."""
    return [p for i, p in enumerate(paths)
            if not any(p == q and j < i or p.startswith(q + os.sep) for j, q in enumerate(paths))]


def _common_state(directory):
    """The non-sharded state saved with a torch_dist checkpoint (megatron_gift.checkpoint
    allows the ``argparse.Namespace`` of Megatron-LM's ``args`` in weights-only loads)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(directory)
