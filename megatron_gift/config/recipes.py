"""Recipe YAMLs, with inheritance: a top-level ``defaults:`` names parent recipes.

::

    # examples/recipes/qwen_7b.yaml
    defaults: base.yaml            # or a list; paths relative to this file's folder
    training:
      train_iters: 468

Parents are merged first, in the order listed (each with its own parents before it), then the
recipe itself, as NeMo RL's configs do. A missing parent and an inheritance cycle are errors
that name the files; a file that is not UTF-8, not YAML or not a mapping at the top is an error
that names it and the line (and column) where it breaks.
"""

import io
import os

import yaml
from omegaconf import DictConfig, OmegaConf

from megatron_gift.errors import ConfigError

# libyaml's parser where PyYAML has it, as OmegaConf's loader: the same syntax, the same messages.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def recipe_layers(path: str) -> list[tuple[str, DictConfig]]:
    """``[(file, its own keys)]`` of the recipe at ``path`` and its ancestors, in merge order
    (farthest ancestor first, ``path`` last); ``defaults`` is removed from each layer."""
    return _layers(os.path.abspath(path), chain=())


def _layers(path: str, chain: tuple) -> list[tuple[str, DictConfig]]:
    named_by = f" (named in defaults: of {chain[-1]})" if chain else ""
    if path in chain:
        cycle = " -> ".join((*chain[chain.index(path):], path))
        raise ConfigError(f"recipe inheritance cycle: {cycle}")
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}{named_by}")
    own = _load(path, named_by)
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


def _load(path: str, named_by: str = "") -> DictConfig:
    """The recipe's own keys; ConfigError naming the file (and where it is broken) when it is
    not UTF-8, not YAML or not a mapping at the top."""
    where = f"recipe {path}{named_by}"
    text = _read(path, where)
    try:
        top = yaml.compose(text, Loader=_YAML_LOADER)
        if top is None:
            return OmegaConf.create()
        if not isinstance(top, yaml.MappingNode):
            kind = "a list" if isinstance(top, yaml.SequenceNode) else f"the value {top.value!r}"
            raise ConfigError(f"{where}: expected sections (a mapping such as 'training:' on its "
                              f"own line) at the top, got {kind} at {_position(top.start_mark)}")
        return OmegaConf.load(io.StringIO(text))
    except yaml.MarkedYAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None


def _read(path: str, where: str) -> str:
    """The file's text; ConfigError naming the line of the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{where}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8; "
                          "save the recipe as UTF-8") from None


def _position(mark: "yaml.Mark") -> str:
    """``line L, column C`` of a yaml mark (0-based there), 1-based."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """One line: where the YAML breaks, what is wrong, and the construct it was reading."""
    mark = error.problem_mark or error.context_mark
    problem = " ".join(str(error.problem or error.context or "").split())
    found = f"{_position(mark)}: {problem}" if mark else problem
    if error.context and error.context_mark and error.problem:
        found += f" ({' '.join(error.context.split())} at {_position(error.context_mark)})"
    return found
