"""Recipe YAMLs, with inheritance: a top-level ``defaults:`` names parent recipes.

::

    # examples/recipes/qwen_7b.yaml
    defaults: base.yaml            # or a list; paths relative to this file's folder
    training:
      train_iters: 468

Parents are merged first, in the order listed (each with its own parents before it), then the
recipe itself, as NeMo RL's configs do. A missing parent and an inheritance cycle are errors
that name the files.
"""

import os

import yaml
from omegaconf import DictConfig, OmegaConf

from megatron_gift.errors import ConfigError


def recipe_layers(path: str) -> list[tuple[str, DictConfig]]:
    """``[(file, its own keys)]`` of the recipe at ``path`` and its ancestors, in merge order
    (farthest ancestor first, ``path`` last); ``defaults`` is removed from each layer."""
    return _layers(os.path.abspath(path), chain=())


def _layers(path: str, chain: tuple) -> list[tuple[str, DictConfig]]:
    if path in chain:
        cycle = " -> ".join((*chain[chain.index(path):], path))
        raise ConfigError(f"recipe inheritance cycle: {cycle}")
    if not os.path.isfile(path):
        named_by = f" (named in defaults: of {chain[-1]})" if chain else ""
        raise ConfigError(f"recipe not found: {path}{named_by}")
    own = _load(path)
    parents = own.pop("defaults", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (OmegaConf.is_list(parents) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"recipe {path}: defaults must be a file name or a list of them, "
                          f"got {parents!r}")
    layers = []
    for parent in parents:
        layers += _layers(os.path.join(os.path.dirname(path), parent), (*chain, path))
    return layers + [(path, own)]


def _load(path: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {path}: expected sections (a mapping) at the top, "
                          f"got {type(loaded).__name__}")
    return loaded
