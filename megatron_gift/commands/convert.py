"""``megatron-gift convert``: Hugging Face <-> Megatron-Core checkpoints.

::

    megatron-gift convert hf-to-megatron --hf HF_DIR --out DIR [--converter auto]
    megatron-gift convert megatron-to-hf --load DIR --out HF_DIR

``hf-to-megatron`` writes a Megatron-LM-layout checkpoint (``DIR/iter_0000000``, torch_dist,
loadable at any TP/PP) plus ``DIR/hf/`` (the model's config and tokenizer); ``megatron-to-hf``
exports any checkpoint the trainer writes as safetensors, config and tokenizer. The work is done
by :mod:`megatron_gift.hf.convert`; this module only parses the command line, so ``--help``
answers without importing torch.
"""

import argparse
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point, plain_text, quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-gift convert",
                                     description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="HF directory -> Megatron checkpoint")
    to_megatron.add_argument("--hf", required=True, help="local HF model directory")
    to_megatron.add_argument("--out", required=True, help="checkpoint root to write")
    to_megatron.add_argument("--converter", default="auto", choices=("auto", "builtin", "bridge"),
                             help="bridge: Megatron-Bridge's AutoBridge; auto: bridge when installed")
    to_hf = commands.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF directory")
    to_hf.add_argument("--load", required=True, help="checkpoint root (or iter_* directory)")
    to_hf.add_argument("--out", required=True, help="HF directory to write")
    to_hf.add_argument("--adapter", action="store_true",
                       help="a LoRA run: write its adapters as a PEFT adapter "
                            "(adapter_config.json, adapter_model.safetensors) for the base model, "
                            "instead of the merged model")
    for command in (to_megatron, to_hf):
        command.add_argument("--overwrite", action="store_true",
                             help="replace a model already in --out (once the new one is "
                                  "complete); without it such an --out is refused")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    from megatron_gift.hf.convert import hf_to_megatron, megatron_to_hf, write_replacing

    if args.command == "hf-to-megatron":
        converters = []

        def convert(directory: str) -> str:
            written, converter = hf_to_megatron(args.hf, directory, args.converter)
            converters.append(converter)
            return written

        written = write_replacing(args.out, args.overwrite, convert)
        print(f"converted {args.hf} -> {written} ({converters[0]} converter)")
    else:
        written = write_replacing(args.out, args.overwrite,
                                  lambda directory: megatron_to_hf(args.load, directory,
                                                                   args.adapter))
        print(f"exported {written}")


if __name__ == "__main__":
    main()
