"""``megatron-gift report RUN [RUN ...] --out DIR``: a run's metrics drawn and summarised.

::

    megatron-gift report runs/default/gift --out runs/default/gift/report
    megatron-gift report runs/sft runs/gift-b2 runs/gift-b20 --out reports/beta-sweep

RUN is a run's --save directory (its metrics.jsonl; configs/ for its resolved config) or a
metrics file. Several runs are overlaid, each named by its directory. DIR gets one PNG per
panel (loss, validation metrics, learning rate, gradient norm, tokens/s, GIFT's diagnostics:
target mass q(y*), student entropy, student p(y*)) and report.html, one self-contained page
with the figures and a summary table. The summary is printed too: per run, the iterations, the
wall time, and the final and best value of the loss and of each validation metric (best: the
lowest, or the highest for accuracy-like metrics).
"""

import argparse
from typing import Optional, Sequence

from megatron_gift.platform.console import entry_point, plain_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-gift report",
                                     description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run's --save directory or its metrics file (JSON lines)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the PNGs and report.html (created)")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    from megatron_gift.tracking.report import write_report

    report = write_report(args.runs, args.out)
    print("\n".join(report.summary).rstrip())
    print(f"report: {report.html} ({len(report.figures)} figures beside it)")


if __name__ == "__main__":
    main()
