"""``python -m megatron_gift.rl_handoff``: start the RL stage from a GIFT run.

::

    python -m megatron_gift.rl_handoff nemo-rl --checkpoint SAVE [--hf HF_DIR] \\
        --nemo-rl-dir /path/to/RL --out grpo_gift.yaml [--base-config grpo_math_8B_megatron.yaml]
        [--tp 4 --pp 4 --num-nodes 8 --gpus-per-node 8 --checkpoint-dir DIR]

writes a NeMo RL GRPO config that inherits one of NeMo RL's Megatron recipes and starts from
the run's checkpoint, and prints the launch lines (one node, SLURM). What the config holds and
which NeMo RL sources it was checked against: :mod:`megatron_gift.rl.handoff`.
"""

import argparse
import os
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point
from megatron_gift.rl.handoff import BASE_CONFIGS, CONTAINER, write_nemo_rl_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_gift.rl_handoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True)
    nemo = sub.add_parser("nemo-rl", help="write a NeMo RL GRPO config (Megatron backend)")
    nemo.add_argument("--checkpoint", required=True, help="GIFT save root (Megatron-LM layout)")
    nemo.add_argument("--hf", help="HF export of the run: config.json + tokenizer (default: "
                                    "CHECKPOINT/hf, kept by runs from a Hugging Face model)")
    nemo.add_argument("--nemo-rl-dir", required=True, help="NeMo RL checkout (launch directory)")
    nemo.add_argument("--out", required=True, help="YAML file to write")
    nemo.add_argument("--base-config", default=BASE_CONFIGS[1],
                      help="recipe under NeMo RL's examples/configs/ to inherit; known Megatron "
                           f"GRPO recipes: {', '.join(BASE_CONFIGS)} (default %(default)s)")
    nemo.add_argument("--checkpoint-dir", help="RL checkpoints (default: <out dir>/grpo_checkpoints)")
    nemo.add_argument("--num-nodes", type=int, default=1)
    nemo.add_argument("--gpus-per-node", type=int, default=8)
    nemo.add_argument("--tp", type=int, help="Megatron tensor parallel size (default: the recipe's)")
    nemo.add_argument("--pp", type=int, help="Megatron pipeline parallel size (default: the recipe's)")
    nemo.add_argument("--container", default=CONTAINER, help="container image for ray.sub")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    lines = write_nemo_rl_config(args.checkpoint, args.hf, args.nemo_rl_dir, args.out,
                                 args.base_config, args.checkpoint_dir, args.num_nodes,
                                 args.gpus_per_node, args.tp, args.pp, args.container)
    print(f"wrote {os.path.abspath(args.out)}\n\none node:\n  {lines[0]}\n\nSLURM:\n  {lines[1]}")


if __name__ == "__main__":
    main()
