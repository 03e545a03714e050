"""``megatron-gift``: the project's one command. Each subcommand is a module here that parses
its arguments and calls the library; ``megatron-gift SUBCOMMAND --help`` says more, and imports
neither torch nor Megatron-Core.

The older entry points stay as aliases: ``torchrun examples/pretrain_gift.py`` (train) and
``python -m megatron_gift.{convert,inspect,plan,evaluate,rl_handoff}``.
"""

import importlib
import sys
from typing import Optional, Sequence

# name -> (module, what it does)
SUBCOMMANDS = {
    "train": ("megatron_gift.commands.train",
              "GIFT (or SFT) training: the embedded CPU job, a recipe, flags; under torchrun"),
    "convert": ("megatron_gift.commands.convert",
                "Hugging Face <-> Megatron-Core checkpoints"),
    "inspect": ("megatron_gift.commands.inspect_checkpoint",
                "what a checkpoint holds, without loading tensors"),
    "plan": ("megatron_gift.commands.plan",
             "GPU memory of a run before it starts; the cheapest layout that fits"),
    "evaluate": ("megatron_gift.commands.evaluate",
                 "sample a checkpoint: pass@k, entropy, KL to a reference, GIFT's target"),
    "rl-handoff": ("megatron_gift.commands.rl_handoff",
                   "start the RL stage: NeMo RL or NeMo-Aligner configs from a GIFT run"),
    "report": ("megatron_gift.commands.report",
               "a run's metrics as figures, an HTML page and a summary; runs overlaid"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: megatron-gift SUBCOMMAND [--help] [arguments]", "",
             "GIFT post-training (Gibbs Initialization with Finite Temperature) on Megatron-Core.",
             "", "subcommands:"]
    lines += [f"  {name:{width}s}  {what}" for name, (_, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``megatron-gift SUBCOMMAND ARGS``; an unknown subcommand is one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: megatron-gift has no subcommand {name!r}; it has "
              f"{', '.join(SUBCOMMANDS)} (megatron-gift --help)", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(SUBCOMMANDS[name][0]).main(rest)
