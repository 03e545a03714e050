"""Transformer Engine (TE): whether it is usable here, and the FP8 settings that need it.

:func:`available` is the one probe of TE in the project. Importing TE can fail in more ways
than a missing package: a TE built against CUDA raises ``OSError`` where a library is missing
and ``RuntimeError`` where there is no driver (Triton's "0 active drivers"). Each of these means
"no TE" here, and so does a Megatron-Core whose own TE extension did not load.

FP8 runs only through TE's layers: Megatron-Core accepts ``TransformerConfig(fp8=...)`` without
TE and then silently trains without FP8. So every FP8 setting is refused where TE is missing
(:func:`refuse_fp8_without_te`, before anything is built or written), and once the models are
built :func:`check_fp8_in_use` confirms that the layers asked to run in FP8 are TE's.
"""

import functools
from typing import TYPE_CHECKING, Iterable

from megatron_gift.errors import UserError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

# A module of TE's Megatron-Core layers lives here (TELayerNormColumnParallelLinear, ...).
_TE_LAYERS_MODULE = "megatron.core.extensions.transformer_engine"


@functools.cache
def available() -> bool:
    """Whether Transformer Engine imports (``transformer_engine.pytorch``) and Megatron-Core's
    TE layers loaded with it."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except (ImportError, OSError, RuntimeError):
        return False
    return bool(HAVE_TE)


def fp8_requested(config: "DictConfig") -> list[str]:
    """The flags of ``config`` that ask for FP8 (empty when it runs without FP8)."""
    precision = config.precision
    asked = []
    if precision.fp8_format is not None:
        asked.append(f"--fp8-format {precision.fp8_format}")
    if precision.reference_precision == "fp8":
        asked.append("--reference-precision fp8")
    return asked


def refuse_fp8_without_te(config: "DictConfig") -> None:
    """Raise UserError when ``config`` asks for FP8 and Transformer Engine is not usable here
    (not installed, or failing to import: no CUDA driver)."""
    asked = fp8_requested(config)
    if asked and not available():
        raise UserError(
            f"{', '.join(asked)} needs Transformer Engine, which is not installed or does not "
            "import on this machine (FP8 runs only in its layers, on a CUDA GPU); run on a GPU "
            "image with Transformer Engine, or drop the FP8 settings (--fp8-format, "
            "--reference-precision bf16)")


def check_fp8_in_use(tf_config, chunks: Iterable["torch.nn.Module"], what: str) -> None:
    """Raise UserError unless ``chunks`` (models built from ``tf_config``, a Megatron-Core
    ``TransformerConfig``) run their layers in FP8: ``tf_config.fp8`` set and the transformer
    layers TE's. Does nothing for a config without FP8. ``what`` names the models."""
    if not tf_config.fp8:
        return
    layers = [m for chunk in chunks for m in chunk.modules()
              if type(m).__module__ == _TE_LAYERS_MODULE]
    if not layers:
        raise UserError(
            f"the {what} was asked to run in FP8 ({tf_config.fp8}, {tf_config.fp8_recipe}) but "
            "was built without Transformer Engine's layers, where Megatron-Core would run it "
            "without FP8; FP8 needs Transformer Engine")


def describe(tf_config, reference_config=None) -> str:
    """``"FP8 hybrid (delayed scaling)..."`` or ``"no FP8"``, for the run's log line."""
    if not tf_config.fp8:
        return "no FP8"
    text = f"FP8 {tf_config.fp8} ({tf_config.fp8_recipe} scaling"
    if tf_config.fp8_param:
        text += ", FP8 weights"
    if tf_config.first_last_layers_bf16:
        text += (f", first {tf_config.num_layers_at_start_in_bf16} and last "
                 f"{tf_config.num_layers_at_end_in_bf16} layers bf16")
    text += ")"
    if reference_config is not None:
        ref = "FP8" if reference_config.fp8 else "bf16"
        if reference_config.fp8_param:
            ref += " with FP8 weights"
        text += f", reference {ref}"
    return text
