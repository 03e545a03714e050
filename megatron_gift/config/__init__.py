"""The run configuration: typed sections (:mod:`.schema`), recipe YAMLs with inheritance
(:mod:`.recipes`), Megatron-LM-style flags and ``section.key=value`` overrides (:mod:`.cli`),
and the value checks (:mod:`.checks`). Imports nothing heavier than OmegaConf."""

from megatron_gift.config.checks import check_layer_split, is_sft, validate
from megatron_gift.config.cli import parse_config
from megatron_gift.config.schema import JobConfig, SECTIONS, flag_name, from_container

__all__ = ["JobConfig", "SECTIONS", "check_layer_split", "flag_name", "from_container", "is_sft",
           "parse_config", "validate"]
