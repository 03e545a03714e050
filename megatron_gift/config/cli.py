"""Command line -> validated run config.

Every leaf ``section.key`` of :mod:`megatron_gift.config.schema` has a flag (Megatron-LM's
spelling: ``--tensor-model-parallel-size``, ``--train-iters``; ``gift.*`` keys are
``--gift-...``); booleans also take ``--no-...``. Precedence: the job's defaults < ``--config
recipe.yaml`` (and the recipes it inherits) < flags < ``section.key=value`` overrides. Every
value is type-checked where it enters, and an error names the key, its flag and where the value
came from (the recipe file, the flag, the override).
"""

import argparse
import difflib
import math
import os
import sys
from typing import Any, NoReturn, Optional, Sequence, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from megatron_gift.config.checks import Refusal, validate
from megatron_gift.config.recipes import recipe_layers
from megatron_gift.config.schema import JobConfig, SECTIONS, flag_name, section_fields
from megatron_gift.errors import ConfigError

_NONE_WORDS = ("none", "null")


def parse_config(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
                 refusals: Sequence[Refusal] = ()) -> DictConfig:
    """The validated run config from ``argv`` (default ``sys.argv[1:]``) over ``defaults``
    (a nested dict of a job's own defaults, e.g. the embedded default job's).

    Raises :class:`megatron_gift.errors.ConfigError` (a ValueError) naming the bad key, its
    flag and its source; a config with several bad values is refused once, naming them all,
    and what the machine checks ``refusals`` refuse too (:func:`.checks.validate`).
    """
    parser = build_parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    recipe, overrides = args.pop("config", None), args.pop("overrides")
    config = OmegaConf.structured(JobConfig)
    if defaults:
        config = merge(config, defaults, "the job's defaults")
    if recipe:
        for path, layer in recipe_layers(recipe):
            config = merge(config, layer, f"recipe {path}")
    for key, value in args.items():
        section, name = key.split(".")
        set_value(config, key, value, f"flag {flag_name(section, name)}")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"{override!r} is neither a flag nor a section.key=value override "
                              "(boolean flags take no value: --bf16 / --no-bf16)")
        set_value(config, key.strip(), _none_or_text(text), f"override {override!r}")
    return validate(config, refusals)


def merge(config: DictConfig, values: Any, source: str) -> DictConfig:
    """``config`` with ``values`` (a nested dict or DictConfig) merged in, type-checked."""
    try:
        return OmegaConf.merge(config, values)
    except OmegaConfBaseException as error:
        raise _explained(error, source) from None


def set_value(config: DictConfig, key: str, value: Any, source: str) -> None:
    """Set ``config[key]`` (``section.key``) to ``value``, type-checked."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name or "." in name:
        raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, _all_keys())}")
    try:
        OmegaConf.update(config, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise _explained(error, source) from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The launcher's argument parser: one group of flags per config section; ``prog`` names
    the command in usage lines (default: the program that runs)."""
    parser = _Parser(
        prog=prog or os.path.basename(sys.argv[0]) or None,
        usage="%(prog)s [--config RECIPE.yaml] [--flag VALUE ...] [section.key=value ...]",
        description="GIFT post-training on Megatron-Core.",
        epilog="Positional overrides: section.key=value (e.g. gift.beta=10 "
               "checkpoint.save=runs/x). Precedence: recipe < flags < overrides.",
        allow_abbrev=False)
    parser.add_argument("--config", metavar="RECIPE.yaml",
                        help="recipe YAML (sections as below; 'defaults:' inherits parents)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides")
    for section in SECTIONS:
        group = parser.add_argument_group(
            section, JobConfig.__dataclass_fields__[section].default_factory.__doc__)
        for f in section_fields(section):
            group.add_argument(flag_name(section, f.name), **_flag_options(section, f))
    return parser


def _flag_options(section: str, f) -> dict:
    choices = f.metadata.get("choices")
    text = f.metadata.get("help", "")
    if choices:
        text += f" {{{', '.join(choices)}}}"
    options = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                   help=f"{text} (default: {f.default})".replace("%", "%%"))
    kind, optional = _field_type(f.type)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = _converter(kind, optional, f"{section}.{f.name}")
        options["metavar"] = {int: "INT", float: "FLOAT"}.get(kind, "VALUE" if not choices
                                                              else "|".join(choices))
    return options


def _field_type(annotation) -> tuple[type, bool]:
    """``(int|float|bool|str, optional)`` of a schema field's annotation."""
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return inner[0], True
    return annotation, False


def _converter(kind: type, optional: bool, key: str):
    names = {int: "an integer", float: "a number (inf allowed)", str: "a string"}

    def convert(text: str):
        if optional and text.lower() in _NONE_WORDS:
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{key} must be {names[kind]}, got {text!r}") from None
        if kind is float and math.isnan(value):
            raise argparse.ArgumentTypeError(f"{key} must be a number, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of printing usage, and suggests flags for mistyped ones."""

    def parse_args(self, args: Optional[Sequence[str]] = None,
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        for arg in unknown:
            if arg.startswith("-"):
                flag = arg.split("=")[0]
                flags = [s for a in self._actions for s in a.option_strings]
                raise ConfigError(f"unrecognised flag {flag}{_suggest(flag, flags)} "
                                  f"(see --help)")
        parsed.overrides = [*parsed.overrides, *unknown]
        return parsed

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in SECTIONS for f in section_fields(s)]


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _none_or_text(text: str) -> Optional[str]:
    return None if text.strip().lower() in _NONE_WORDS else text


def _explained(error: OmegaConfBaseException, source: str) -> ConfigError:
    """A ConfigError naming the key, its flag and ``source`` for an OmegaConf merge error."""
    key = str(error.full_key or "")
    if isinstance(error, ConfigKeyError) or "not in" in str(error.msg):
        return ConfigError(f"{source}: unknown key {key!r}{_suggest(key, _all_keys() + list(SECTIONS))}")
    section, _, name = key.partition(".")
    flag = f" ({flag_name(section, name)})" if section in SECTIONS and name else ""
    wanted = ""
    try:
        kind, _ = _field_type(JobConfig.__dataclass_fields__[section].default_factory
                              .__dataclass_fields__[name].type)
        wanted = {int: "an integer", float: "a number", bool: "true or false",
                  str: "a string"}.get(kind, "")
    except KeyError:
        pass
    value = getattr(error, "value", None)
    return ConfigError(f"{source}: {key}{flag} must be {wanted or 'of its type'}, got {value!r}")
