"""Checkpoints in Megatron-LM's layout, written with ``megatron.core.dist_checkpointing``.

::

    SAVE/latest_checkpointed_iteration.txt      the newest complete checkpoint
    SAVE/iter_0000010/                          torch_dist: model, optimizer, scheduler, RNG,
                                                data position, run config (common state)

Tensors are saved with their global offsets, so a checkpoint loads into any TP/PP layout. The
tracker file is written last (atomically), so a run killed while saving resumes from the
previous checkpoint. Only the student is saved; the reference's source path is recorded.
"""

import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_gift.model import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
# Megatron-LM keeps its arguments in the common state; Megatron-Bridge (and so NeMo RL's
# ``format: megatron_lm``) reads the layout from them. Loading them needs the class allowed.
torch.serialization.add_safe_globals([argparse.Namespace])
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "untie_embeddings_and_output_weights", "kv_channels",
                     "add_qkv_bias", "rotary_base", "rope_scaling_factor", "norm_epsilon",
                     "vocab_size")


def latest_checkpoint(path):
    """The newest complete ``iter_*`` directory under ``path`` (or ``path`` itself), or None."""
    if path is None or not os.path.isdir(path):
        return None
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            return os.path.join(path, f"iter_{int(f.read().strip()):07d}")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    return None


def save_checkpoint(save_dir, iteration, chunks, optimizer, scheduler, consumed_samples, common):
    """Save the student chunks and the training state; ``common``: plain dict of run facts.

    Without an optimizer (``None``, as for a converted model) only the weights are saved.
    """
    directory = os.path.join(save_dir, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, **_optimizer_kwargs(optimizer))
        state.update(opt_param_scheduler=scheduler.state_dict(), rng_state=_rng_object())
    state.update(iteration=iteration, consumed_samples=consumed_samples, run=common,
                 args=argparse.Namespace(
                     tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                     pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                     no_save_optim=optimizer is None, no_save_rng=optimizer is None,
                     ckpt_format="torch_dist"))
    dist_checkpointing.save(state, directory)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(save_dir, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(save_dir, TRACKER))
    dist.barrier()
    return directory


def run_facts(directory):
    """The run facts (config, architecture, layout, ...) saved with ``directory``."""
    return dist_checkpointing.load_common_state_dict(directory)["run"]


def load_checkpoint(directory, chunks, optimizer, scheduler):
    """Resume everything from ``directory``; returns ``(iteration, consumed_samples, run)``."""
    common = dist_checkpointing.load_common_state_dict(directory)
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                      **_optimizer_kwargs(optimizer))
    same_layout = common["run"]["layout"] == layout()
    if same_layout:
        state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, directory)
    for k, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(k, len(chunks))])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"].data if hasattr(loaded["rng_state"], "data")
                     else loaded["rng_state"])
    return common["iteration"], common["consumed_samples"], common["run"]


def load_model_weights(path, chunks, expected_architecture):
    """Load only model weights (a base checkpoint or a run's newest) into ``chunks``.

    Raises ValueError when the checkpoint's architecture or vocab differs from
    ``expected_architecture`` (a dict like :func:`architecture`), before reading tensors.
    """
    directory = latest_checkpoint(path)
    if directory is None:
        raise FileNotFoundError(f"no Megatron checkpoint at {path} (no {TRACKER} or metadata.json)")
    stored = run_facts(directory)["architecture"]
    differing = {k: (stored.get(k), v) for k, v in expected_architecture.items()
                 if stored.get(k) != v}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in differing.items())
        raise ValueError(f"checkpoint {directory} does not match the model: {details}")
    loaded = dist_checkpointing.load(_model_state(chunks), directory)
    for k, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(k, len(chunks))])
    return directory


def architecture(model_config, padded_vocab_size):
    """The facts a checkpoint must share with the model it is loaded into."""
    facts = {key: model_config.get(key) for key in ARCHITECTURE_KEYS}
    facts["padded_vocab_size"] = padded_vocab_size
    return facts


def _model_key(index, count):
    return "model" if count == 1 else f"model{index}"


def _model_state(chunks):
    return {_model_key(k, len(chunks)): unwrap(chunk).sharded_state_dict()
            for k, chunk in enumerate(chunks)}


def _optimizer_kwargs(optimizer):
    if any(type(o).__name__ == "DistributedOptimizer"
           for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        return {"metadata": {"distrib_optim_sharding_type": "fully_reshardable"}}
    return {}


def layout():
    """``[tp, pp, dp]`` of this run, as recorded in checkpoints."""
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size()]


def _rng_object():
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["accelerator"] = torch.cuda.get_rng_state()
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", state, (pp, tp), offset,
                         replica_id=parallel_state.get_data_parallel_rank())


def _restore_rng(state):
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "accelerator" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["accelerator"])
