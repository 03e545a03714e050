"""Multi-process test harness: gloo process groups, tiny Megatron GPT models, full weights.

Each distributed test starts its own ranks (``run_distributed``), and every rank initialises
and tears down its own Megatron parallel state, as Megatron-Core's own unit tests do. Ranks are
forked from a fork server that imported torch, Megatron-Core and the trainer once (:data:`PRELOAD`),
so a rank costs a fork, not a 10-30 s import; each gets the test's environment at the moment
it starts, as a spawned process would.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# What the fork server imports once: every rank starts with these modules loaded.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_gift.engine.trainer",
           "transformers"]
_forkserver_ready = []


def run_distributed(world_size, fn, *args, initialize=True):
    """Run ``fn(*args)`` on ``world_size`` ranks; re-raise the first rank's failure.

    With ``initialize`` the harness makes the gloo group and applies the CPU layer; without,
    ``fn`` gets only torchrun's environment variables (as the launcher does).
    """
    if not _forkserver_ready:
        mp.set_forkserver_preload(PRELOAD)
        _forkserver_ready.append(True)
    port = free_port()
    mp.start_processes(_rank_main, args=(world_size, port, fn, args, initialize,
                                         dict(os.environ)),
                       nprocs=world_size, join=True, start_method="forkserver")


TINY_MODEL = {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64, "seq_length": 32}


def train_on_ranks(overrides, world_size=1, argv=()):
    """Run ``megatron_gift.engine.trainer.train`` on ``world_size`` spawned ranks, as torchrun
    would (each rank makes its own process group)."""
    run_distributed(world_size, train_rank, list(argv), overrides, initialize=False)


def train_rank(argv, overrides):
    """One rank of :func:`train_on_ranks`."""
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    train(parse_config(argv, defaults=overrides))


@contextlib.contextmanager
def one_rank_world():
    """A one-rank gloo world in this process for the duration of a block (no process starts)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_here(overrides, argv=()):
    """Run ``megatron_gift.engine.trainer.train`` in this process, in a one-rank world of its own
    (the trainer joins it, as it joins torchrun's): what a one-rank launch computes, without the
    launch."""
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    with one_rank_world():
        return train(parse_config(list(argv), defaults=overrides))


def make_tiny_world(root):
    """Synthetic data and a tiny base checkpoint (TINY_MODEL, 8 SFT iterations) under ``root``;
    returns the paths: ``corpus``, ``demos``, ``valid`` (JSONL) and ``base`` (checkpoint)."""
    from megatron_gift.demo import synthetic

    paths = {"corpus": str(root / "corpus.jsonl"), "demos": str(root / "demos.jsonl"),
             "valid": str(root / "valid.jsonl"), "base": str(root / "base")}
    synthetic.write_pretraining_corpus(paths["corpus"], 256, seed=0)
    synthetic.write_demonstrations(paths["demos"], 128, seed=1)
    synthetic.write_demonstrations(paths["valid"], 16, seed=2)
    train_here({"model": dict(TINY_MODEL), "gift": {"beta": float("inf")},
                    "data": {"train_path": paths["corpus"], "text_field": "text"},
                    "training": {"train_iters": 8, "micro_batch_size": 4, "global_batch_size": 8},
                    "optimizer": {"lr": 1e-2}, "checkpoint": {"save": paths["base"]},
                    "logging": {"progress": False}})
    return paths


_STARTED_RUNS = []


def start_run(args, log_path, env=None, cwd=None):
    """``subprocess.Popen`` of a run in its own session (so a signal to its group reaches every
    process it starts), output to ``log_path``; :func:`stop_started_runs` ends whatever is left."""
    log = open(log_path, "w")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                               start_new_session=True)
    _STARTED_RUNS.append(process)
    return process


def stop_started_runs():
    """SIGKILL the process group of every run :func:`start_run` started that is still alive (a
    test that failed before its run ended must not leave a training run behind)."""
    while _STARTED_RUNS:
        process = _STARTED_RUNS.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, initialize, environment):
    os.environ.clear()  # the test's environment, not the fork server's
    os.environ.update(environment)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if not initialize:
        fn(*args)
        return
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron_gift.platform.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    try:
        fn(*args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def model_parallel(tp=1, pp=1, vpp=None, seed=1234, ep=1):
    """Megatron parallel state for the duration of a block."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def tiny_gpt_config(**overrides):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_gpt(config, vocab_size, seq_length, vp_stage=None):
    """This rank's stage of a RoPE GPT with the local (no Transformer Engine) layer spec."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab_size, max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def global_parameters(model):
    """``{global name: (local param, partition dim or None, stride)}`` for one model chunk.

    The global name replaces the stage-local layer index by the layer's global index, so the
    same name denotes the same weight at every pipeline layout.
    """
    params = {}
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.", name)
        if match:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{layer}." + name[match.end():]
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        params[name] = (param, dim, getattr(param, "partition_stride", 1))
    return params


def full_tensor(name, shape):
    """A deterministic full-size weight for ``name``: small noise, norms around 1."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g)
    return 1 + 0.1 * noise if "norm" in name or "layer_norm" in name else 0.2 * noise


def shard(full, dim, stride, tp_size, tp_rank):
    """This rank's part of ``full`` along ``dim`` (Megatron's strided TP partitioning)."""
    if dim is None:
        return full
    return torch.cat([c.chunk(tp_size, dim)[tp_rank] for c in full.chunk(stride, dim)], dim)


def unshard(shards, dim, stride):
    """Inverse of :func:`shard` for the list of every TP rank's part."""
    if dim is None:
        return shards[0]
    pieces = [s.chunk(stride, dim) for s in shards]
    return torch.cat([torch.cat([p[k] for p in pieces], dim) for k in range(stride)], dim)


def set_full_weights(models):
    """Give every model chunk the deterministic weights of :func:`full_tensor`."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for model in models:
        for name, (param, dim, stride) in global_parameters(model).items():
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp_size
            with torch.no_grad():
                param.copy_(shard(full_tensor(name, shape), dim, stride, tp_size, tp_rank))


def gather_full_grads(models):
    """``{global name: full grad}`` from every rank (all ranks get the dict)."""
    from megatron.core import parallel_state

    local = {}
    for model in models:
        for name, (param, dim, stride) in global_parameters(model).items():
            local[name] = (param.grad.detach().clone(), dim, stride)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (parallel_state.get_pipeline_model_parallel_rank(),
                                        tp_rank, local))
    by_name = {}
    for _, rank_in_tp, grads in sorted(everything, key=lambda x: (x[0], x[1])):
        for name, (grad, dim, stride) in grads.items():
            by_name.setdefault(name, ({}, dim, stride))[0][rank_in_tp] = grad
    return {name: unshard([parts[k] for k in sorted(parts)], dim, stride)
            for name, (parts, dim, stride) in by_name.items()}


def causal_mask(batch, seq):
    """Boolean attention mask ``[b, 1, s, s]``, True where attention is blocked."""
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    return mask.view(1, 1, seq, seq).expand(batch, 1, seq, seq)
