"""Megatron-Core on machines without CUDA: the one place that patches it.

Megatron-Core 0.19 calls CUDA directly in a few places that a CPU/gloo run goes through.
:func:`enable_cpu_megatron` patches exactly those, and only in a process where
``torch.cuda.is_available()`` is False (there every patched call would raise anyway). It is
never applied on import; launchers and test fixtures call it explicitly.

What each patch covers (megatron-core 0.19.2; file :: function, relative to megatron/core):

``current_device``  ``torch.cuda.current_device()`` returns the CPU device instead of raising.
    utils.py :: GlobalMemoryBuffer.get_tensor (attention scratch buffers);
    models/common/embeddings/rotary_pos_embedding.py :: RotaryEmbedding.get_emb, .forward;
    pipeline_parallel/p2p_communication.py :: P2PCommunicator._communicate (receive buffers),
    ._communicate_shapes; optimizer/optimizer.py :: MegatronOptimizer.get_loss_scale.
``synchronize``  ``torch.cuda.synchronize()`` is a no-op (CPU ops are synchronous).
    pipeline_parallel/p2p_communication.py :: P2PCommunicator._communicate_shapes,
    ._communicate (batch_p2p_sync); dist_checkpointing/strategies/filesystem_async.py ::
    FileSystemWriterAsync.preload_tensors.
``rng``  the CUDA RNG calls use the CPU default generator.
    tensor_parallel/random.py :: _get_cuda_rng_state, _set_cuda_rng_state,
    CudaRNGStatesTracker.add / .fork (``torch.cuda.get_rng_state``, ``torch.cuda.manual_seed``),
    model_parallel_cuda_manual_seed; transformer/dot_product_attention.py ::
    DotProductAttention.forward forks the tracker on every call.
``current_stream``  ``torch.cuda.current_stream()`` returns a stream whose waits are no-ops.
    distributed/param_and_grad_buffer.py :: _ParamAndGradBucketGroup.start_grad_sync.
``clip_grads``  gradient clipping accepts CPU fp32 grads.
    optimizer/clip_grads.py :: clip_grad_by_total_norm_fp32 asserts
    ``param.grad.type() == 'torch.cuda.FloatTensor'``; the replacement scales the same grads by
    the same ``max_norm / (total_norm + 1e-6)`` (also as imported by optimizer/optimizer.py).
``cuda_literals``  ``torch.zeros/ones/empty/tensor/full(..., device="cuda")`` allocate on CPU,
    through a private ``torch`` proxy installed in these modules only:
    pipeline_parallel/schedules.py :: forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving, ..._without_interleaving
    (``total_num_tokens``); optimizer/optimizer.py :: MegatronOptimizer._get_found_inf_flag,
    MixedPrecisionOptimizer.__init__, FP32Optimizer.__init__;
    optimizer/clip_grads.py :: get_grad_norm_fp32, clip_grad_by_total_norm_fp32,
    count_zeros_fp32; utils.py :: local_multi_tensor_l2_norm.
``tensor_cuda``  ``Tensor.cuda()`` returns the tensor itself.
    models/common/language_module/language_module.py :: setup_embeddings_and_output_layer
    (tied embeddings across pipeline stages move the shared weight to "cuda" before their
    all-reduce).

Models must be built with ``use_cpu_initialization=True`` and given an explicit attention
mask (transformer/utils.py :: get_default_causal_mask allocates on "cuda"). Interleaved pipeline
schedules need ``batch_p2p_comm=False`` on gloo: at PP=2 the previous and the next stage are the
same peer, and gloo matches the batched sends and receives to one peer in posting order, so a
gradient lands in an activation buffer (pipeline_parallel/p2p_communication.py ::
_batched_p2p_ops; the unbatched _p2p_ops orders them by even/odd rank).
"""

import importlib
import types

import torch

SUPPORTED_MEGATRON_CORE = "0.19"
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
)
_applied = []


def enable_cpu_megatron() -> list[str]:
    """Make Megatron-Core 0.19 run on CPU (gloo) when CUDA is absent; idempotent.

    Returns the names of the patches in effect (empty where CUDA is available).
    Raises RuntimeError for a megatron-core release these patches were not written for.
    """
    if torch.cuda.is_available() or _applied:
        return list(_applied)
    from megatron.core import package_info

    version = package_info.__version__
    if version.split(".")[:2] != SUPPORTED_MEGATRON_CORE.split("."):
        raise RuntimeError(
            f"megatron_gift's CPU support is written for megatron-core {SUPPORTED_MEGATRON_CORE}.x, "
            f"found {version}; install megatron-core=={SUPPORTED_MEGATRON_CORE}.* "
            "(see requirements.txt) or run on a CUDA machine"
        )
    for name, patch in _PATCHES:
        patch()
        _applied.append(name)
    return list(_applied)


def applied_patches() -> list[str]:
    """The names of the patches in effect in this process (empty until
    :func:`enable_cpu_megatron` ran, and where CUDA is available)."""
    return list(_applied)


def _patch_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_synchronize():
    torch.cuda.synchronize = lambda device=None: None


def _patch_rng():
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


class _NoOpStream:
    def wait_event(self, event: torch.cuda.Event) -> None:
        pass

    def wait_stream(self, stream: torch.cuda.Stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_current_stream():
    torch.cuda.current_stream = lambda device=None: _NoOpStream()


def _patch_cuda_literals():
    for module_name in _CUDA_LITERAL_MODULES:
        importlib.import_module(module_name).torch = _CpuTorch()


def _patch_tensor_cuda():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_clip_grads():
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attribute = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attribute) for p in parameters if getattr(p, attribute, None) is not None]
        clip_coeff = max_norm / (float(total_norm) + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


class _CpuTorch(types.ModuleType):
    """``torch`` whose tensor factories read ``device="cuda"`` as the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attribute = getattr(torch, name)
        if name not in self._FACTORIES:
            return attribute

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return attribute(*args, **kwargs)

        return factory


_PATCHES = (
    ("current_device", _patch_current_device),
    ("synchronize", _patch_synchronize),
    ("rng", _patch_rng),
    ("current_stream", _patch_current_stream),
    ("clip_grads", _patch_clip_grads),
    ("cuda_literals", _patch_cuda_literals),
    ("tensor_cuda", _patch_tensor_cuda),
)
