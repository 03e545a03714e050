"""``megatron-gift plan``: the GPU memory of a GIFT run, before it is started.

::

    megatron-gift plan --config examples/recipes/llama3.1-70b-gift.yaml --num-gpus 32
    megatron-gift plan --config RECIPE.yaml --sequence-parallel --json
    megatron-gift plan --num-layers 32 --hidden-size 4096 ... --gpu-memory-gib 141

takes the training command's recipe, flags and ``section.key=value`` overrides, builds nothing
and reads no weights or data: the architecture is the model section, completed from the base's
HF config.json as training completes it (``--pretrained-checkpoint HF_DIR``). For each
pipeline stage, worst first, it prints the bytes per GPU of the student's weights, gradients and
optimizer state (a mixture-of-experts model's experts split over EP, their state sharded over
the ranks holding the same experts), the frozen reference's weights, the activations the
schedule keeps in flight (a MoE layer's for a perfectly balanced router),
the pipeline buffers (the reference's half included), the loss buffers of the head the run
asks for (``--gift-head``: ``logits``, both models' logit shards and the loss's buffers;
``fused``, the fused head's chunk tiles, gradient sums and what it keeps, no logits; the
table's ``head`` line and the JSON's ``head`` object name it) and, for FP8 runs (the
``precision`` section), what Transformer Engine keeps beside the weights (FP8 copies and
transposes, scaling state); a LoRA run (``--lora-rank``) as the engine builds it (the frozen
base without gradients or optimizer state, the adapters with both, no reference weights, the
local layers' activations with what each adapter keeps; the ``lora`` line and the JSON's
``lora`` object name the rank and the trained parameters), then whether the worst stage fits
in 90% of the GPU's memory (the
rest is left to the CUDA context, NCCL and the allocator) and, if not, the cheapest layout that
does: the fewest GPUs over tensor, pipeline and data parallel sizes (and expert parallel sizes
for a MoE model) with sequence parallelism, the distributed optimizer and recompute (each
checked by planning it). Last, the time a
stopping run needs for its step and its save (estimated from assumed throughputs), as the
``torchrun --shutdown-timeout`` to launch it with. The model is Megatron-Core with Transformer
Engine's layers on a Hopper GPU, as GPU runs use them; see ``megatron_gift/planning/memory.py`` for
what is counted.
"""

import argparse
import json
import math
import sys
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party

PROG = "megatron-gift plan"
# Exit status of a plan that does not fit (a bad input exits with errors.USER_ERROR_EXIT, 2).
DOES_NOT_FIT_EXIT = 1
EXIT_STATUS = ("Exit status: 0 when the plan fits; 1 when it does not (the plan is printed all\n"
               "the same, with the cheapest layout that fits); 2 on a bad input (one line\n"
               "'error: ...').")


def _own_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, add_help=add_help, allow_abbrev=False)
    group = parser.add_argument_group("planner")
    group.add_argument("--gpu-memory-gib", type=float, default=80.0, metavar="GIB",
                       help="memory of one GPU in GiB (default: 80, an H100 80GB)")
    group.add_argument("--num-gpus", type=int, default=None, metavar="N",
                       help="GPUs of the run; data parallel = N / (TP x PP x CP) "
                            "(default: TP x PP x CP, one data-parallel rank)")
    group.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return parser


def _print_help() -> None:
    from megatron_gift.config.cli import build_parser

    parser = build_parser()
    parser.prog = PROG
    parser.usage = (f"{PROG} [--config RECIPE.yaml] [--flag VALUE ...] [section.key=value ...] "
                    "[--gpu-memory-gib GIB] [--num-gpus N] [--json]")
    parser.description = plain_text(__doc__)
    parser.epilog = f"{parser.epilog}\n\n{EXIT_STATUS}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    planner = parser.add_argument_group("planner")
    for action in _own_parser()._actions:
        if action.option_strings:
            planner._add_action(action)
    parser.print_help()


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _print_help()
        return
    own, rest = _own_parser().parse_known_args(argv)
    from megatron_gift.config import parse_config
    from megatron_gift.planning import memory
    from megatron_gift.planning.table import as_text
    from megatron_gift.errors import UserError

    if not math.isfinite(own.gpu_memory_gib) or own.gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory-gib must be a positive finite number of GiB, got "
                        f"{own.gpu_memory_gib} (e.g. --gpu-memory-gib 80 for an H100 80GB)")
    quiet_third_party()
    from megatron_gift.engine.run_spec import complete_model_section

    config = complete_model_section(parse_config(rest))
    run = memory.run_from_config(config, own.num_gpus)
    result = memory.plan(run, int(own.gpu_memory_gib * memory.GIB))
    print(json.dumps(result.as_dict(), indent=1) if own.json else as_text(result))
    if not result.fits:
        sys.exit(DOES_NOT_FIT_EXIT)


if __name__ == "__main__":
    main()
