"""``megatron-gift inspect DIR``: what a checkpoint holds, without loading tensors.

::

    megatron-gift inspect runs/qwen-gift            # the newest iteration under it
    megatron-gift inspect runs/qwen-gift/iter_0000078 --json

prints the iteration, the samples consumed, whether it is a training checkpoint or weights
only, the layout it was saved at (TP, PP, DP), the reference's source, the converter and HF
model it came from (for converted models), the architecture, and the run's config as YAML.
"""

import argparse
import json
from typing import Any, Optional, Sequence

from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-gift inspect",
                                     description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint root (newest iteration) or iter_* directory")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def describe(path: str) -> dict[str, Any]:
    """The facts of the newest checkpoint under ``path`` as a plain dict."""
    from megatron_gift.core.checkpoint import common_state, is_weights_only, saved_layout
    from megatron_gift.core.paths import TRACKER
    from megatron_gift.engine.run_spec import resume_point
    from megatron_gift.errors import MissingFileError

    directory = resume_point(path, path, announce=False)  # the checkpoint a resume would take
    if directory is None:
        raise MissingFileError(f"{path}: no checkpoint ({TRACKER} or metadata.json)")
    common = common_state(directory)
    run = common.get("run", {})
    tp, pp, dp, cp = saved_layout(run)
    return {"directory": directory, "iteration": common.get("iteration"),
            "consumed_samples": common.get("consumed_samples"),
            "kind": "weights only" if is_weights_only(common) else "training (resumable)",
            "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                       "data_parallel_size": dp, "context_parallel_size": cp},
            "reference_source": run.get("reference_source"),
            "fingerprints": run.get("fingerprints"),
            "converted_from": run.get("converted_from"), "converter": run.get("converter"),
            "architecture": run.get("architecture"), "config": run.get("config")}


def as_text(facts: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    layout = facts["layout"]
    lines = [f"checkpoint        {facts['directory']}",
             f"iteration         {facts['iteration']} ({facts['consumed_samples']} samples "
             "consumed)",
             f"kind              {facts['kind']}",
             f"saved at          TP={layout['tensor_model_parallel_size']} "
             f"PP={layout['pipeline_model_parallel_size']} DP={layout['data_parallel_size']} "
             f"CP={layout['context_parallel_size']} (loads at any layout)"]
    if facts["reference_source"]:
        lines.append(f"reference         {facts['reference_source']}")
    if facts["fingerprints"]:
        lines.append("fingerprints      " + ", ".join(
            f"{k} {v}" for k, v in facts["fingerprints"].items() if v is not None))
    if facts["converted_from"]:
        converted = facts["converted_from"]
        converted = ", ".join(converted) if isinstance(converted, list) else converted
        lines.append(f"converted from    {converted} ({facts['converter']} converter)")
    architecture = facts["architecture"] or {}
    lines.append("architecture      " + ", ".join(f"{k}={v}" for k, v in architecture.items()))
    if facts["config"]:
        lines += ["config:", OmegaConf.to_yaml(OmegaConf.create(facts["config"])).rstrip()]
    return "\n".join(lines)


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    facts = describe(args.checkpoint)
    print(json.dumps(facts, indent=1, default=str) if args.json else as_text(facts))


if __name__ == "__main__":
    main()
