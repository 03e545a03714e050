"""``megatron-gift rl-handoff``: start the RL stage from a GIFT run.

::

    megatron-gift rl-handoff nemo-rl --checkpoint SAVE [--hf HF_DIR] \\
        --nemo-rl-dir /path/to/RL --out grpo_gift.yaml [--base-config grpo_math_8B_megatron.yaml]
        [--tp 4 --pp 4 --ep 8 --num-nodes 8 --gpus-per-node 8 --checkpoint-dir DIR]

    megatron-gift rl-handoff nemo-aligner --checkpoint SAVE [--hf HF_DIR] --out DIR \\
        [--algorithm reinforce|ppo] [--tp 4 --pp 1 --num-nodes 1 --gpus-per-node 8] [--tar]

``nemo-rl`` writes a NeMo RL GRPO config that inherits one of NeMo RL's Megatron recipes and
starts from the run's checkpoint, and prints the launch lines (one node, SLURM). What the config
holds and which NeMo RL sources it was checked against: :mod:`megatron_gift.rl.handoff`.

``nemo-aligner`` exports the run's newest checkpoint as a NeMo 1.x model directory
(``DIR/model.nemo``: ``model_config.yaml`` + ``model_weights/``, loadable by NeMo-Aligner 0.7 on
Megatron-Core 0.10), writes the REINFORCE or PPO actor config over Aligner's recipe and the
heterogeneous SLURM job of Aligner's docs, and prints the launch lines. What is written and
why: :mod:`megatron_gift.rl.nemo_aligner`.
"""

import argparse
import os
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party
from megatron_gift.rl import nemo_aligner
from megatron_gift.rl.handoff import BASE_CONFIGS, CONTAINER, write_nemo_rl_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-gift rl-handoff",
                                     description=plain_text(__doc__),
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
    nemo.add_argument("--ep", type=int, help="Megatron expert parallel size, MoE models "
                      "(default: the recipe's)")
    nemo.add_argument("--etp", type=int, help="Megatron expert tensor parallel size, MoE models "
                      "(default: the recipe's)")
    nemo.add_argument("--container", default=CONTAINER, help="container image for ray.sub")
    aligner = sub.add_parser("nemo-aligner", help="export a NeMo 1.x model + REINFORCE/PPO config "
                                                  "for NeMo-Aligner 0.7")
    aligner.add_argument("--checkpoint", required=True, help="GIFT save root (Megatron-LM layout)")
    aligner.add_argument("--hf", help="HF directory with the run's tokenizer (default: "
                                      "CHECKPOINT/hf, kept by runs from a Hugging Face model)")
    aligner.add_argument("--out", required=True, help="directory to write (model.nemo/, the "
                                                      "actor YAML, the sbatch script)")
    aligner.add_argument("--algorithm", default="reinforce", choices=sorted(nemo_aligner.ALGORITHMS),
                         help="Aligner's actor recipe to start from (default %(default)s)")
    aligner.add_argument("--tp", type=int, default=1, help="actor tensor parallel size")
    aligner.add_argument("--pp", type=int, default=1, help="actor pipeline parallel size")
    aligner.add_argument("--num-nodes", type=int, default=1, help="actor nodes")
    aligner.add_argument("--gpus-per-node", type=int, default=8)
    aligner.add_argument("--reward-nodes", type=int, default=1,
                         help="nodes of the reward (REINFORCE) or critic (PPO) server")
    aligner.add_argument("--aligner-dir", default=nemo_aligner.ALIGNER_DIR,
                         help="NeMo-Aligner checkout inside the container (default %(default)s)")
    aligner.add_argument("--container", default=nemo_aligner.CONTAINER,
                         help="container image with NeMo 2.1 + Aligner 0.7 (default %(default)s)")
    aligner.add_argument("--tar", action="store_true", help="also write DIR/model.nemo.tar")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    if args.target == "nemo-aligner":
        lines = nemo_aligner.write_nemo_aligner(
            args.checkpoint, args.hf, args.out, args.algorithm, args.tp, args.pp, args.num_nodes,
            args.gpus_per_node, args.reward_nodes, args.aligner_dir, args.container, args.tar)
        out = os.path.abspath(args.out)
        print(f"wrote {out}/{nemo_aligner.MODEL_DIR} and "
              f"{out}/{nemo_aligner.ALGORITHMS[args.algorithm][1]}\n\n"
              f"SLURM (heterogeneous job: reward/critic server + actor):\n  {lines[0]}\n\n"
              f"actor only, inside the container (reward server already running):\n  {lines[1]}")
        return
    lines = write_nemo_rl_config(args.checkpoint, args.hf, args.nemo_rl_dir, args.out,
                                 args.base_config, args.checkpoint_dir, args.num_nodes,
                                 args.gpus_per_node, args.tp, args.pp, args.container,
                                 args.ep, args.etp)
    print(f"wrote {os.path.abspath(args.out)}\n\none node:\n  {lines[0]}\n\nSLURM:\n  {lines[1]}")


if __name__ == "__main__":
    main()
