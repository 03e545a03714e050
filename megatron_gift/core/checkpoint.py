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
import queue
import random
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from omegaconf import DictConfig

from megatron_gift.core import lora
from megatron_gift.core.model import unwrap
from megatron_gift.core.paths import (TRACKER, is_complete, iteration_dir,  # noqa: F401
                                      iterations, latest_checkpoint)
from megatron_gift.errors import MissingFileError, UserError

if TYPE_CHECKING:
    from megatron_gift.config.schema import Model
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# Megatron-LM keeps its arguments in the common state; Megatron-Bridge (and so NeMo RL's
# ``format: megatron_lm``) reads the layout from them. Loading them needs the class allowed.
torch.serialization.add_safe_globals([argparse.Namespace])
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "untie_embeddings_and_output_weights", "kv_channels",
                     "add_qkv_bias", "rotary_base", "rope_scaling_factor", "norm_epsilon",
                     "vocab_size", "qk_layernorm", "num_moe_experts", "moe_router_topk",
                     "moe_ffn_hidden_size", "moe_layer_freq", "moe_norm_topk_prob")
# Keys added to ARCHITECTURE_KEYS later, and what a checkpoint written before them had.
ARCHITECTURE_DEFAULTS = {"qk_layernorm": False, "num_moe_experts": None, "moe_router_topk": 2,
                         "moe_ffn_hidden_size": None, "moe_layer_freq": "1",
                         "moe_norm_topk_prob": True}


def save_checkpoint(save_dir: str, iteration: int, chunks: Sequence[torch.nn.Module],
                    optimizer: Optional["MegatronOptimizer"],
                    scheduler: Optional["OptimizerParamScheduler"], consumed_samples: int,
                    common: dict[str, Any]) -> str:
    """Save the student chunks and the training state; ``common``: plain dict of run facts.

    Without an optimizer (``None``, as for a converted model) only the weights are saved. A
    LoRA run (``common["lora_base"]``: the Megatron checkpoint its frozen base came from) saves
    its adapters alone, not the base again.
    """
    directory = iteration_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    _write_results_in_process()
    state = _model_state(chunks)
    if common.get("lora_base"):
        state = _adapters_of(state)
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


def _write_results_in_process() -> None:
    """Saves here are synchronous: dist_checkpointing writes in this process's threads, and its
    results queue can be an in-process one. Megatron-Core makes it a ``multiprocessing.Manager``
    queue (dist_checkpointing/strategies/filesystem_async.py :: get_write_results_queue), for
    its asynchronous saves: the manager's server process is spawned at the first save (which
    re-imports the launcher script and Megatron-Core: the first save took ~10 s longer than the
    next ones), and a SIGTERM sent to all the job's processes (SLURM) kills it, so the save the
    signal asked for failed. Called before every save; sets the queue once."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def damage(directory: str) -> Optional[str]:
    """What is wrong with the iteration ``directory`` (``"iter_0000004/__0_0.distcp is
    truncated"``), or None when every file its index names is there at its full size. Reads
    only the index (``.metadata``) and file sizes, so it is cheap at any model size."""
    from torch.distributed.checkpoint import FileSystemReader

    name = os.path.basename(os.path.normpath(directory))
    if not os.path.isdir(directory):
        return f"{name} is missing"
    if not is_complete(directory):
        return f"{name} is incomplete (no metadata.json or .metadata: its save did not finish)"
    try:
        index = FileSystemReader(directory).read_metadata()
    except Exception as error:  # any unreadable index is damage, whatever torch raises
        return f"{name}/.metadata is unreadable ({type(error).__name__})"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for relative, size in sorted(needed.items()):
        path = os.path.join(directory, relative)
        if not os.path.isfile(path):
            return f"{name}/{relative} is missing"
        if os.path.getsize(path) < size:
            return f"{name}/{relative} is truncated ({os.path.getsize(path)} of {size} bytes)"
    return None


def newest_intact(root: str, below: Optional[int] = None) -> Optional[str]:
    """The newest iteration directory under ``root`` (older than ``below`` if given) that
    :func:`damage` finds nothing wrong with, or None."""
    for iteration in reversed(iterations(root)):
        directory = iteration_dir(root, iteration)
        if (below is None or iteration < below) and damage(directory) is None:
            return directory
    return None


def refuse_damaged(directory: str) -> None:
    """Raise a UserError naming what is wrong with the iteration ``directory`` and the newest
    intact checkpoint to ``--load`` instead; return when it is intact."""
    what = damage(directory)
    if what is None:
        return
    root = os.path.dirname(os.path.abspath(directory))
    number = os.path.basename(os.path.normpath(directory)).removeprefix("iter_")
    older = newest_intact(root, below=int(number) if number.isdigit() else None)
    way = (f"the newest intact one is {older}: resume from it with --load {older}" if older
           else "no older intact checkpoint is left there")
    raise UserError(f"checkpoint {directory} is damaged: {what}; {way}")


def _load_tensors(state: dict, directory: str) -> dict:
    """``dist_checkpointing.load`` that reports a damaged checkpoint in one line."""
    try:
        return dist_checkpointing.load(state, directory)
    except Exception:
        refuse_damaged(directory)
        raise


def run_facts(directory: str) -> dict[str, Any]:
    """The run facts (config, architecture, layout, ...) saved with ``directory``."""
    return common_state(directory)["run"]


def common_state(directory: str) -> dict[str, Any]:
    """Everything an iteration directory holds besides tensors: ``iteration``,
    ``consumed_samples``, ``run`` (the facts above), Megatron-LM's ``args``, and for a training
    checkpoint ``opt_param_scheduler``. Needs no process group."""
    try:
        return dist_checkpointing.load_common_state_dict(directory)
    except Exception:
        refuse_damaged(directory)
        raise


def is_weights_only(common: dict[str, Any]) -> bool:
    """True for a checkpoint without training state (what the converter writes)."""
    return "opt_param_scheduler" not in common


def load_checkpoint(directory: str, chunks: Sequence[torch.nn.Module],
                    optimizer: "MegatronOptimizer", scheduler: "OptimizerParamScheduler",
                    new_schedule: bool = False) -> tuple[int, int, dict[str, Any]]:
    """Resume everything from ``directory``; returns ``(iteration, consumed_samples, run)``.

    ``new_schedule``: the optimizer's param groups keep the learning rates of this run (the
    scheduler must have been built with ``override_opt_param_scheduler``); otherwise the saved
    groups must match the current ones.
    """
    common = dist_checkpointing.load_common_state_dict(directory)
    state = _model_state(chunks)
    adapters_only = bool(common["run"].get("lora_base"))
    if adapters_only:  # the base was loaded into the chunks before (load_base_of)
        state = _adapters_of(state)
    _give_sgd_a_state_initializer(optimizer)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                      **_optimizer_kwargs(optimizer))
    same_layout = saved_layout(common["run"]) == layout()
    if same_layout:
        state["rng_state"] = _rng_object()
    loaded = _load_tensors(state, directory)
    _load_into(chunks, loaded, adapters_only)
    if new_schedule:
        _take_current_group_settings(loaded["optimizer"], optimizer)
    _fill_missing_group_settings(loaded["optimizer"], optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"].data if hasattr(loaded["rng_state"], "data")
                     else loaded["rng_state"])
    return common["iteration"], common["consumed_samples"], common["run"]


def load_model_weights(path: str, chunks: Sequence[torch.nn.Module],
                       expected_architecture: dict[str, Any]) -> dict[str, dict]:
    """Load only model weights (a base checkpoint or a run's newest) into ``chunks``; returns
    the tensors as read, before the chunks cast them (``{"model": state}``, or ``"model0"``,
    ``"model1"``, ... for virtual stages: the form Megatron-Core's
    ``reload_model_params(state_dict=...)`` takes).

    Raises a UserError when the checkpoint's architecture or vocab differs from
    ``expected_architecture`` (a dict like :func:`architecture`), before reading tensors.
    """
    directory = latest_checkpoint(path)
    if directory is None:
        raise MissingFileError(f"no Megatron checkpoint at {path} (no {TRACKER} or metadata.json)")
    base = run_facts(directory).get("lora_base")
    if base:  # a LoRA run's adapters: its base first, from where the run loaded it
        if latest_checkpoint(base) is None:
            raise MissingFileError(f"{directory} holds LoRA adapters for the base {base}, "
                                   "which is gone: restore it there (or convert the base "
                                   "model to that path again)")
        load_model_weights(base, chunks, expected_architecture)
    stored = {**ARCHITECTURE_DEFAULTS, **run_facts(directory)["architecture"]}
    differing = {k: (stored.get(k), v) for k, v in expected_architecture.items()
                 if stored.get(k) != v}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in differing.items())
        raise UserError(f"checkpoint {directory} does not match the model: {details}")
    requested = _model_state(chunks)
    partial = bool(base) or (not _holds_adapters(directory)
                             and any(map(lora.has_adapters, chunks)))
    if base:
        requested = _adapters_of(requested)
    elif partial:  # a base model's weights into a LoRA model: its adapters keep their start
        requested = _adapters_of(requested, keep=False)
    loaded = _load_tensors(requested, directory)
    _load_into(chunks, loaded, partial)
    return {_model_key(k, len(chunks)): loaded[_model_key(k, len(chunks))]
            for k in range(len(chunks))}


def architecture(model_config: "DictConfig | Model", padded_vocab_size: int) -> dict[str, Any]:
    """The facts a checkpoint must share with the model it is loaded into."""
    facts = {key: getattr(model_config, key) for key in ARCHITECTURE_KEYS}
    facts["padded_vocab_size"] = padded_vocab_size
    return facts


def _adapters_of(state: dict, keep: bool = True) -> dict:
    """The model state ``{"model": {key: ...}}`` with only the LoRA adapters' entries
    (``keep=False``: all but them)."""
    return {key: {k: v for k, v in part.items() if lora.is_adapter(k) == keep}
            for key, part in state.items()}


def _load_into(chunks: Sequence[torch.nn.Module], loaded: dict, partial: bool) -> None:
    """The loaded tensors into the chunks; ``partial``: they are some of each chunk's
    tensors (the base or the adapters), the rest keep their values."""
    for k, chunk in enumerate(chunks):
        state = loaded[_model_key(k, len(chunks))]
        if partial:
            state = {**chunk.state_dict(), **state}
        chunk.load_state_dict(state)


def _holds_adapters(directory: str) -> bool:
    """Whether the checkpoint holds LoRA adapters (its run's config had ``lora.rank``)."""
    config = run_facts(directory).get("config") or {}
    return bool((config.get("lora") or {}).get("rank"))


def _model_key(index, count):
    return "model" if count == 1 else f"model{index}"


def _model_state(chunks):
    return {_model_key(k, len(chunks)): unwrap(chunk).sharded_state_dict()
            for k, chunk in enumerate(chunks)}


def _take_current_group_settings(saved: dict, optimizer: "MegatronOptimizer") -> None:
    """Give the saved param groups the identifying settings (max_lr, min_lr, wd, ...) of the
    current ones, group by group in construction order, so that Megatron-Core matches them
    (optimizer/optimizer.py :: _filter_and_reorder_param_groups) and the new values apply."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    saved_parts = [saved] if "param_groups" in saved else [saved[k] for k in sorted(saved)]
    for part, inner in zip(saved_parts, inners):
        groups = part["param_groups"]
        current = inner.optimizer.param_groups
        if len(groups) != len(current):
            raise UserError(f"the checkpoint's optimizer has {len(groups)} parameter groups, "
                            f"this run {len(current)}: the model or optimizer differs")
        for old, new in zip(groups, current):
            for key in param_group_identifier_keys:
                if key in new:
                    old[key] = new[key]


def _fill_missing_group_settings(saved: dict, optimizer: "MegatronOptimizer") -> None:
    """Settings a loaded param group lacks take the current group's values. A mixture-of-
    experts run saved at another expert-parallel size had another number of optimizers (one
    at EP 1, dense and experts apart above), so the param groups Megatron-Core reads back for
    this run's optimizers carry only what the two layouts share."""
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    saved_parts = [saved] if "param_groups" in saved else [saved[k] for k in sorted(saved)]
    for part, inner in zip(saved_parts, inners):
        for old, new in zip(part.get("param_groups", []), inner.optimizer.param_groups):
            for key, value in new.items():
                if key != "params":
                    old.setdefault(key, value)


def _give_sgd_a_state_initializer(optimizer: "MegatronOptimizer") -> None:
    """Megatron-Core 0.19 builds SGD with ``init_state_fn = None``
    (optimizer/__init__.py :: _get_megatron_optimizer_based_on_param_groups), and
    ``FP32Optimizer.sharded_state_dict(is_loading=True)`` calls it, so an SGD run could not be
    resumed. The initializer given here creates the momentum buffers the checkpoint then fills."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.config.optimizer == "sgd" and getattr(inner, "init_state_fn", None) is None:
            inner.init_state_fn = _sgd_momentum_buffers


def _sgd_momentum_buffers(opt: torch.optim.Optimizer, config: object = None) -> None:
    for group in opt.param_groups:
        if group.get("momentum", 0):
            for param in group["params"]:
                if len(opt.state[param]) == 0:
                    opt.state[param]["momentum_buffer"] = torch.zeros_like(param.data)


def _optimizer_kwargs(optimizer):
    """Megatron-Core's metadata for the optimizer's checkpoint state: its keys named by the
    parameter alone, without the ``chained_<i>.`` prefix that a mixture-of-experts run's two
    optimizers (dense, experts) would add, so that the state reshards between expert layouts
    (Megatron builds one optimizer at EP 1, two above); the distributed optimizer's state in
    its fully reshardable format."""
    metadata = {"chained_optim_avoid_prefix": True}
    if any(type(o).__name__ == "DistributedOptimizer"
           for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return {"metadata": metadata}


def layout() -> list[int]:
    """``[tp, pp, dp, cp]`` of this run, as recorded in checkpoints."""
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size(),
            parallel_state.get_context_parallel_world_size()]


def saved_layout(run: dict[str, Any]) -> list[Optional[int]]:
    """``[tp, pp, dp, cp]`` a checkpoint's run facts record (checkpoints that predate context
    parallelism in the layout record ``[tp, pp, dp]``: CP 1)."""
    recorded = list(run.get("layout") or [None, None, None])
    return recorded + [1] * (4 - len(recorded))


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
    # One state per (PP, TP) rank; the ranks of a DP x CP group are its replicas (Megatron-LM's
    # get_rng_state counts CP into the replica id likewise): with DP alone, CP ranks would
    # write one key twice and the save fails ("Duplicate ShardedObject keys").
    replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", state, (pp, tp), offset, replica_id=replica)


def _restore_rng(state):
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "accelerator" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["accelerator"])
