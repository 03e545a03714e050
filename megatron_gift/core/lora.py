"""LoRA adapters on Megatron-Core's tensor-parallel linears, and the reference they make free.

A LoRA linear computes ``y = W x + (alpha / r) B A dropout(x)`` with the base ``W`` frozen and
``A`` ``[r, in]``, ``B`` ``[out, r]`` trained. Under tensor parallelism each adapter follows its
base layer (Megatron-Bridge's ``ParallelLinearAdapter`` splits both matrices and gathers
between them; here one of the two is replicated, so the low-rank activation needs no gather):

- **column-parallel** (``linear_qkv``, ``linear_fc1``: output split over TP): ``A`` replicated,
  ``B`` split like the output, ``[out/tp, r]``. The input is the full one (gathered from the
  sequence-parallel region where SP is on, its gradient split back without a sum); ``A x`` goes
  through ``copy_to_tensor_model_parallel_region``, so its gradient is summed over TP and
  ``A``'s gradient is whole and the same on every rank.
- **row-parallel** (``linear_proj``, ``linear_fc2``: input split over TP): ``A`` split like the
  input, ``[r, in/tp]``, ``B`` replicated. ``A x`` is summed over TP
  (``reduce_from_tensor_model_parallel_region``), ``B`` applied on every rank, and with SP the
  result is scattered over the sequence like the base layer's output.

``B`` starts at zero and ``A`` at PyTorch's default (PEFT's ``kaiming_uniform_(a=sqrt(5))``),
drawn from a generator seeded by the layer's name and the run's seed over the *whole* ``A``
before it is split, so every layout starts from the same adapters. The split tensors carry
Megatron's tensor-parallel attributes (the gradient norm counts each once) and checkpoint as
shards of their split axis.

With the adapters switched off (:func:`adapters_disabled`) the model is the base model: GIFT's
frozen reference without a second copy of the weights.
"""

import contextlib
import copy
import functools
import math
import zlib
from typing import Iterator, NamedTuple, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_gift.config.checks import lora_targets

COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoraSettings(NamedTuple):
    """``rank`` r, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the adapter's
    input, the ``targets`` (names of :data:`TARGETS`), and the ``seed`` of ``A``."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    seed: int


def settings(config) -> Optional[LoraSettings]:
    """The run's adapters (``config``: the run's OmegaConf), or None without ``lora.rank``."""
    lora = config.lora
    if lora.rank is None:
        return None
    return LoraSettings(lora.rank, float(lora.alpha), float(lora.dropout), lora_targets(config),
                        config.training.seed)


class _LoraMixin:
    """The adapter of a Megatron linear; the concrete classes are made by :func:`lora_linear`."""

    settings: LoraSettings
    kind: str  # "column" or "row"

    def _add_adapter(self, input_size: int, output_size: int) -> None:
        r, tp = self.settings.rank, parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        device, dtype = self.weight.device, self.weight.dtype
        full_a = initial_a(self.layer_key, r, input_size, self.settings.seed)
        if self.kind == "column":
            a, b_shape = full_a, (output_size // tp, r)
        else:
            a, b_shape = full_a.chunk(tp, dim=1)[rank], (output_size, r)
        self.lora_a = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        split = self.lora_b if self.kind == "column" else self.lora_a
        set_tensor_model_parallel_attributes(split, True, 0 if self.kind == "column" else 1, 1)
        self.lora_dropout = torch.nn.Dropout(self.settings.dropout)
        self.adapter_enabled = True

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.settings.alpha / self.settings.rank
        sp = self.config.sequence_parallel
        if self.kind == "column":
            if sp:
                x = tensor_parallel.gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=False)
            low = tensor_parallel.copy_to_tensor_model_parallel_region(
                self.lora_dropout(x) @ self.lora_a.T)
            return (low @ self.lora_b.T) * scale
        low = tensor_parallel.reduce_from_tensor_model_parallel_region(
            self.lora_dropout(x) @ self.lora_a.T)
        out = (low @ self.lora_b.T) * scale
        return tensor_parallel.scatter_to_sequence_parallel_region(out) if sp else out

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if self.adapter_enabled:
            output = output + self._adapter(input_)
        return output, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """The base layer's, with ``lora_a``/``lora_b`` sharded on their split axis."""
        axis = ({"weight": 0, "bias": 0, "lora_b": 0} if self.kind == "column"
                else {"weight": 1, "lora_a": 1})
        state = self.state_dict(prefix="", keep_vars=True)
        groups = ({"tp_group": self.tp_group, "dp_cp_group": metadata["dp_cp_group"]}
                  if metadata and "dp_cp_group" in metadata else {})
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets,
                                                      **groups)
        if self.layer_key.endswith("linear_fc1") and self.config.gated_linear_unit:
            # The SwiGLU fc1's rows are [gate; up] per TP rank: B's rows likewise, mapped to
            # the global [gate; up] as Megatron-Core's MLP maps fc1's weight.
            sharded[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(
                sharded[f"{prefix}lora_b"], sharded_offsets,
                (metadata or {}).get("singleton_local_shards", False), tp_group=self.tp_group,
                dp_group=groups.get("dp_cp_group"))
        return sharded


def initial_a(layer_key: str, rank: int, input_size: int, seed: int) -> torch.Tensor:
    """The whole ``A`` ``[rank, input_size]`` (fp32) an adapter starts from, the same whatever
    the layout: PyTorch's default init (``kaiming_uniform_(a=sqrt(5))``, as PEFT's) drawn from a
    generator seeded by the run's ``seed`` and ``layer_key`` (``"<layer number>.<linear>"``)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{layer_key}:{seed}".encode()))
    a = torch.empty(rank, input_size)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def lora_linear(base: type, kind: str, settings: LoraSettings, layer_key: str) -> type:
    """A subclass of the Megatron linear ``base`` (``kind`` ``"column"`` or ``"row"``) with an
    adapter; ``layer_key`` names the layer (seeds ``A``)."""

    class LoraLinear(_LoraMixin, base):
        def __init__(self, input_size: int, output_size: int, *args, **kwargs):
            super().__init__(input_size, output_size, *args, **kwargs)
            self._add_adapter(input_size, output_size)

    LoraLinear.settings, LoraLinear.kind, LoraLinear.layer_key = settings, kind, layer_key
    LoraLinear.__name__ = LoraLinear.__qualname__ = f"Lora{base.__name__}"
    return LoraLinear


def with_adapters(layer_specs: list, settings: LoraSettings, first_layer: int) -> list:
    """Copies of the local layer specs ``layer_specs`` (layers ``first_layer``, ... of the
    model) whose target linears carry adapters."""
    specs = []
    for offset, spec in enumerate(layer_specs):
        spec = copy.deepcopy(spec)
        layer = first_layer + offset
        for owner, name in _linears(spec):
            if name in settings.targets:
                base = getattr(owner, name)
                kind = "column" if name in COLUMN_PARALLEL else "row"
                if base not in (ColumnParallelLinear, RowParallelLinear):
                    raise ValueError(f"LoRA takes Megatron-Core's local linears, not {base}")
                setattr(owner, name, lora_linear(base, kind, settings, f"{layer}.{name}"))
        specs.append(spec)
    return specs


def _linears(spec) -> Iterator[tuple[object, str]]:
    """``(submodules, name)`` of the four linears of a layer spec (its MLP is a ModuleSpec or,
    in Megatron-Core 0.19's local spec, a ``functools.partial`` of ``MLP.as_mlp_submodule``)."""
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp
    mlp = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    yield attention, "linear_qkv"
    yield attention, "linear_proj"
    yield mlp, "linear_fc1"
    yield mlp, "linear_fc2"


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` is an adapter's (not the frozen base)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def freeze_base(model: torch.nn.Module) -> None:
    """Every parameter but the adapters' stops taking gradients, so Megatron-Core's DDP gives it
    no gradient buffer and its optimizer no state. The embedding's output (first pipeline
    stage) is marked as needing a gradient while gradients are on, as Hugging Face's
    ``enable_input_require_grads`` does: with the embedding frozen it needs none, and
    Megatron-Core's full recompute (reentrant checkpoints) would then give the adapters of the
    layers it wraps no gradient."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(_output_requires_grad)


def _output_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_()
    return output


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model for the duration: every adapter of ``model`` off."""
    layers = [m for m in model.modules() if isinstance(m, _LoraMixin)]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_enabled = True


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _LoraMixin) for m in model.modules())


def scale(config) -> float:
    """The adapters' scale alpha / r of the run's config."""
    return float(config.lora.alpha) / config.lora.rank


def merged(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A one-rank (TP = 1) state dict with every adapter folded into its base weight,
    ``W + factor * B @ A`` (computed in fp32, stored in ``W``'s dtype), and no adapter left."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for key, a in state.items():
        if key.endswith(".lora_a"):
            prefix = key[: -len("lora_a")]
            weight = out[prefix + "weight"]
            delta = state[prefix + "lora_b"].float() @ a.float()
            out[prefix + "weight"] = (weight.float() + factor * delta).to(weight.dtype)
    return out
