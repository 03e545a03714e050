"""The configuration reference, ``docs/reference/config.md``, generated from the schema.

::

    python -m megatron_gift.config.reference > docs/reference/config.md
    python -m megatron_gift.config.reference --write            # the same, into that file
    python -m megatron_gift.config.reference --check            # exit 1 when the file is stale

Every section of :mod:`megatron_gift.config.schema` and every key in it, with its flag (as
:func:`~megatron_gift.config.schema.flag_name` spells it), type, default, allowed values and help
text, read from the dataclasses when it runs: a key added to the schema appears here by
regenerating, and ``tests/test_docs.py`` fails while the committed file differs.
"""

import argparse
import math
import sys
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from megatron_gift.config import schema

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "reference" / "config.md"
REGENERATE = "python -m megatron_gift.config.reference --write"

_MARKDOWN_SPECIAL = "\\`*_[]<|"


def config_reference() -> str:
    """The Markdown of the configuration reference: one table per section, one row per key."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from megatron_gift/config/schema.py by `{REGENERATE}`; "
        "do not edit by hand. -->",
        "",
        "Every key of a run's configuration, by section, as `megatron-gift train --help` lists "
        "them. A key is set in a recipe as `section: {key: value}`, on the command line by its "
        "flag, or as a `section.key=value` override; booleans also take `--no-...`, and `none` "
        "(or `null`) unsets an optional key. Precedence: the job's defaults < `--config "
        "recipe.yaml` < flags < overrides ([Configuration](../configuration.md)).",
        "",
        "Sections: " + ", ".join(f"[`{s}`](#{s})" for s in schema.SECTIONS) + ".",
    ]
    for section in schema.SECTIONS:
        lines += ["", f"## {section}", ""]
        doc = _section_class(section).__doc__
        if doc:
            lines += [_escape(" ".join(doc.split())), ""]
        lines += ["| key | flag | type | default | choices | help |",
                  "|---|---|---|---|---|---|"]
        hints = typing.get_type_hints(_section_class(section))
        for f in schema.section_fields(section):
            kind, optional = _kind(hints.get(f.name, f.type))
            flag = f"`{schema.flag_name(section, f.name)}`"
            if kind is bool:
                flag += f", `--no-{schema.flag_name(section, f.name).removeprefix('--')}`"
            choices = f.metadata.get("choices") or ()
            cells = [
                f"`{section}.{f.name}`",
                flag,
                _type_name(kind) + (" or none" if optional else ""),
                f"`{_default(f)}`",
                ", ".join(f"`{c}`" for c in choices),
                _escape(" ".join(str(f.metadata.get("help", "")).split())),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _section_class(section: str) -> type:
    return schema.JobConfig.__dataclass_fields__[section].default_factory


def _kind(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of a field annotation: ``Optional[int]`` is ``(int, True)``."""
    if typing.get_origin(annotation) is Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (inner[0] if len(inner) == 1 else Union[tuple(inner)]), True
    return annotation, False


def _type_name(kind: Any) -> str:
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).replace("typing.", "")


def _default(f) -> str:
    """The default as a recipe spells it: ``true``, ``none``, ``inf``, ``1e-05``."""
    value = f.default
    if value is MISSING and f.default_factory is not MISSING:
        value = f.default_factory()
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(value)


def _escape(text: str) -> str:
    """``text`` with the characters Markdown would read as markup escaped (a table cell)."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_gift.config.reference",
        description="Print the configuration reference (Markdown) generated from the schema.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", nargs="?", const=str(DEFAULT_PATH), metavar="PATH",
                       help="write it to PATH (default: docs/reference/config.md)")
    group.add_argument("--check", nargs="?", const=str(DEFAULT_PATH), metavar="PATH",
                       help="exit 1 when PATH differs from what the schema generates")
    args = parser.parse_args(argv)
    text = config_reference()
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}", file=sys.stderr)
    elif args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date with megatron_gift/config/schema.py: run {REGENERATE}",
                  file=sys.stderr)
            sys.exit(1)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
