"""Hugging Face <-> Megatron-Core checkpoints for the Llama, Qwen2 and Mistral families.

::

    python -m megatron_gift.convert hf-to-megatron --hf HF_DIR --out DIR
    python -m megatron_gift.convert megatron-to-hf --load DIR --out HF_DIR

``hf-to-megatron`` writes a Megatron-LM-layout checkpoint (``DIR/iter_0000000``, torch_dist,
global offsets, so it loads at any TP/PP) plus ``DIR/hf/``: the model's ``config.json`` and
tokenizer files, no weights. ``megatron-to-hf`` is the exact inverse for any checkpoint the
trainer writes: safetensors shards, ``config.json`` and the tokenizer, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``. Weights keep their dtype, so a round
trip is bit-identical.

The built-in converter needs only megatron-core, transformers and safetensors and runs on CPU
in one process (the model is held once, in its own dtype). Where Megatron-Bridge is installed,
``--converter bridge`` loads the HF weights through ``AutoBridge`` instead; ``auto`` picks it
when present. The command says which one ran.

Weight mapping (Megatron local-spec names; HF ``model.`` prefix omitted)::

    embedding.word_embeddings.weight   [Vp, h]        embed_tokens.weight [V, h], zero-padded
    layers.i.self_attention.linear_qkv [g*(q/g+2)*d]  per KV group g: its q heads, then k, v
    layers.i.mlp.linear_fc1            [2f, h]        cat(gate_proj, up_proj)
    layers.i.self_attention.q_layernorm [d]           self_attn.q_norm (Qwen3; k likewise)
    layers.i.mlp.router.weight         [E, h]         mlp.gate.weight (MoE layers)
    layers.i.mlp.experts.local_experts.j.linear_fc1  cat(mlp.experts.j.gate_proj, up_proj)
    layers.i.mlp.experts.local_experts.j.linear_fc2  mlp.experts.j.down_proj
    output_layer.weight                [Vp, h]        lm_head.weight (absent when tied)
"""

import filecmp
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_gift.config import JobConfig, from_container
from megatron_gift.core import checkpoint
from megatron_gift.errors import USER_ERROR_EXIT, MissingFileError, UserError
from megatron_gift.platform import once
from megatron_gift.platform.distributed import world_of_one
from megatron_gift.config.checks import lora_targets
from megatron_gift.core import lora
from megatron_gift.hf import adapters
from megatron_gift.hf.qkv import fuse_qkv, split_qkv
from megatron_gift.hf.architecture import (ASSETS, check_tokenizer_files, hf_assets, moe_layers,
                                           hf_config_from_model_section, is_hf_directory,
                                           model_section_from_hf)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_LAYER_MAP = {  # Megatron name in layer i -> HF name in layer i (one-to-one tensors)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}
_QK_NORMS = {"q_layernorm.weight": "q_norm.weight", "k_layernorm.weight": "k_norm.weight"}


def hf_to_megatron(hf_dir: str, out_dir: str, converter: str = "auto") -> tuple[str, str]:
    """Convert the HF model in ``hf_dir`` to a checkpoint root ``out_dir``; returns the
    iteration directory and the converter that ran ("builtin" or "bridge")."""
    section = model_section_from_hf(hf_dir)
    converter = pick_converter(converter)
    weights = weight_files(hf_dir)
    check_tokenizer_files(hf_dir)
    dtype = checkpoint_dtype(weights)
    config = OmegaConf.structured(JobConfig)
    config.model.update(section, tokenizer=os.path.abspath(hf_dir))
    config.training.bf16 = dtype == torch.bfloat16
    with world_of_one():
        model = _build(config, dtype)
        if converter == "bridge":
            _bridge_load(hf_dir, model)
        else:
            _load_hf_weights(model, weights, config.model)
        run = _run_facts(config, model, source=os.path.abspath(hf_dir), converter=converter)
        directory = checkpoint.save_checkpoint(out_dir, 0, [model], None, None, 0, run)
    copy_assets(hf_dir, out_dir)
    return directory, converter


def megatron_to_hf(load_dir: str, out_dir: str, adapter: bool = False) -> str:
    """Export the newest checkpoint under ``load_dir`` (any TP/PP it was saved at) as an HF
    directory ``out_dir``; returns ``out_dir``. A LoRA run's adapters are merged into the
    weights (a plain HF model), or with ``adapter`` written alone as a PEFT adapter
    (:mod:`megatron_gift.hf.adapters`) for the base model."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer

    directory = checkpoint.latest_checkpoint(load_dir)
    if directory is None:
        raise MissingFileError(f"no Megatron checkpoint at {load_dir}")
    run = checkpoint.run_facts(directory)
    config = from_container(run["config"])
    if adapter and config.lora.rank is None:
        raise UserError(f"--adapter: {directory} is not a LoRA run (no lora.rank); export it "
                        "without --adapter")
    dtype = torch.bfloat16 if config.training.bf16 else torch.float32
    config.parallel.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                           virtual_pipeline_model_parallel_size=None)
    with world_of_one():
        model = _build(config, dtype)
        checkpoint.load_model_weights(load_dir, [model], checkpoint.architecture(
            config.model, model.vocab_size))
        weights = model.state_dict()
    if adapter:
        return adapters.write_peft_adapter(out_dir, weights, config, lora_targets(config),
                                           _base_name(run))
    if config.lora.rank is not None:
        weights = lora.merged(weights, lora.scale(config))
    state = hf_state_from_megatron(weights, config.model)
    # The HF config and tokenizer: kept beside the checkpoint, else where the model came from.
    assets = hf_assets(load_dir) or hf_assets(config.model.tokenizer)
    base = None
    if assets and os.path.isfile(os.path.join(assets, "config.json")):
        with open(os.path.join(assets, "config.json")) as f:
            base = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(assets or config.model.tokenizer
                                              or _bundled_tokenizer())
    hf_config = hf_config_from_model_section(config.model, base)
    hf_config.dtype = dtype
    if base is None:  # a model trained here: its special tokens are the tokenizer's
        hf_config.update({f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id")
                          for kind in ("bos", "eos", "pad")})
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_torch_state_dict(state, out_dir)
    tokenizer.save_pretrained(out_dir)
    if assets and os.path.isfile(os.path.join(assets, "generation_config.json")):
        shutil.copy(os.path.join(assets, "generation_config.json"), out_dir)
    return out_dir


def _base_name(run: dict) -> Optional[str]:
    """The HF base model a LoRA run's adapter goes onto, where the run recorded one."""
    sources = [s for s in (run.get("converted_from") or []) if s]
    return sources[0] if sources else None


def megatron_tensors_from_hf(read: Callable[[str], torch.Tensor], model: DictConfig,
                             padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Megatron local-spec name, tensor)`` at TP=1, reading HF tensors one at a time.

    ``read(name)``: the HF tensor ``name`` (without the ``model.`` prefix, except
    ``lm_head.weight``); ``model``: the model config section; ``padded_vocab``: the
    embedding rows of the Megatron model.
    """
    heads, groups = model.num_attention_heads, model.num_query_groups
    d = model.kv_channels or model.hidden_size // heads
    sparse = moe_layers(model)
    yield "embedding.word_embeddings.weight", _pad_rows(read("embed_tokens.weight"), padded_vocab)
    yield "decoder.final_layernorm.weight", read("norm.weight")
    if model.untie_embeddings_and_output_weights:
        yield "output_layer.weight", _pad_rows(read("lm_head.weight"), padded_vocab)
    for i in range(model.num_layers):
        src, dst = f"layers.{i}.", f"decoder.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            yield dst + ours, read(src + theirs)
        attn = src + "self_attn."
        for name in ("weight", "bias") if model.add_qkv_bias else ("weight",):
            yield f"{dst}self_attention.linear_qkv.{name}", fuse_qkv(
                *(read(f"{attn}{p}_proj.{name}") for p in "qkv"), heads, groups, d)
        if model.qk_layernorm:
            for ours, theirs in _QK_NORMS.items():
                yield f"{dst}self_attention.{ours}", read(attn + theirs)
        yield from _mlp_from_hf(read, src + "mlp.", dst + "mlp.",
                                model.num_moe_experts if sparse[i] else None)


def hf_state_from_megatron(state: dict[str, torch.Tensor],
                           model: DictConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a Megatron local-spec state dict (TP=1); the inverse mapping."""
    heads, groups = model.num_attention_heads, model.num_query_groups
    d = model.kv_channels or model.hidden_size // heads
    vocab = model.vocab_size
    sparse = moe_layers(model)
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
          "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if model.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = state["output_layer.weight"][:vocab]
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            hf[dst + theirs] = state[src + ours]
        for name in ("weight", "bias") if model.add_qkv_bias else ("weight",):
            q, k, v = split_qkv(state[f"{src}self_attention.linear_qkv.{name}"], heads, groups, d)
            hf.update({f"{dst}self_attn.{p}_proj.{name}": t for p, t in zip("qkv", (q, k, v))})
        if model.qk_layernorm:
            for ours, theirs in _QK_NORMS.items():
                hf[f"{dst}self_attn.{theirs}"] = state[f"{src}self_attention.{ours}"]
        hf.update(_mlp_to_hf(state, src + "mlp.", dst + "mlp.",
                             model.num_moe_experts if sparse[i] else None))
    return {k: _own_storage(v) for k, v in hf.items()}


def _mlp_from_hf(read: Callable[[str], torch.Tensor], src: str, dst: str,
                 experts: Optional[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's MLP (``src``/``dst``: the HF / Megatron ``mlp.`` prefixes): a SwiGLU, or
    with ``experts`` the router and each expert's SwiGLU."""
    if experts is None:
        yield dst + "linear_fc1.weight", torch.cat([read(src + "gate_proj.weight"),
                                                    read(src + "up_proj.weight")])
        yield dst + "linear_fc2.weight", read(src + "down_proj.weight")
        return
    yield dst + "router.weight", read(src + "gate.weight")
    for j in range(experts):
        yield from _mlp_from_hf(read, f"{src}experts.{j}.", f"{dst}experts.local_experts.{j}.",
                                None)


def _mlp_to_hf(state: dict[str, torch.Tensor], src: str, dst: str,
               experts: Optional[int]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_mlp_from_hf` (``src``/``dst``: the Megatron / HF prefixes)."""
    if experts is None:
        gate, up = state[src + "linear_fc1.weight"].chunk(2)
        return {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up,
                dst + "down_proj.weight": state[src + "linear_fc2.weight"]}
    out = {dst + "gate.weight": state[src + "router.weight"]}
    for j in range(experts):
        out.update(_mlp_to_hf(state, f"{src}experts.local_experts.{j}.", f"{dst}experts.{j}.",
                              None))
    return out


def cached_conversion(hf_dir: str, cache_root: Optional[str] = None,
                      converter: str = "auto") -> str:
    """The Megatron checkpoint of ``hf_dir`` in the conversion cache, converted once by
    ``converter`` (auto | builtin | bridge; the one that ran is part of the cache key and is
    recorded in the checkpoint).

    Called by every rank of a job: global rank 0 converts (in a subprocess, so the job's
    process group stays untouched) when the cache misses; the others wait for the result on the
    file system (:mod:`megatron_gift.once`), however long it takes. The cache key covers the
    directory and its files' sizes and times, so an edited model converts again.
    ``cache_root`` must be visible to every node (default ``$MEGATRON_GIFT_CACHE`` or
    ``~/.cache/megatron_gift``).
    """
    converter = pick_converter(converter)
    out = os.path.join(cache_root or once.cache_root(), f"{_cache_key(hf_dir)}-{converter}")
    once.build_once(lambda: checkpoint.latest_checkpoint(out) is not None,
               lambda: _convert_in_subprocess(hf_dir, out, converter),
               is_worker=not dist.is_initialized() or dist.get_rank() == 0,
               others_wait=dist.is_initialized() and dist.get_world_size() > 1,
               marker=out + ".failed", what=f"converting {hf_dir}")
    return out


def _convert_in_subprocess(hf_dir: str, out: str, converter: str) -> None:
    """Convert into a private directory beside ``out`` and rename it into place, so that a job
    never sees a half-written conversion and two jobs converting together do not mix their
    files: the first rename wins, the other conversion is dropped."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC", "MASTER_", "GROUP_", "ROLE_", "LOCAL_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    private = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.{socket.gethostname()}.",
                               suffix=".tmp", dir=os.path.dirname(out))
    result = subprocess.run([sys.executable, "-m", "megatron_gift.convert", "hf-to-megatron",
                             "--hf", hf_dir, "--out", private, "--converter", converter],
                            env=env, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        shutil.rmtree(private, ignore_errors=True)
    if result.returncode == USER_ERROR_EXIT:  # a bad model directory: its one-line error
        lines = result.stderr.strip().splitlines() or ["error: (no message)"]
        raise UserError(f"converting {hf_dir}: {lines[-1].removeprefix('error: ')}")
    if result.returncode != 0:
        raise RuntimeError(f"converting {hf_dir} into {out} failed:\n{result.stderr[-2000:]}")
    try:
        os.rename(private, out)
    except OSError:  # another job's conversion is in place already
        if checkpoint.latest_checkpoint(out) is None:
            raise
        shutil.rmtree(private, ignore_errors=True)


def _own_storage(tensor):
    """``tensor``, copied when it is a slice of a larger one (safetensors stores storages)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _pad_rows(weight, rows):
    if weight.size(0) > rows:
        raise UserError(f"vocab {weight.size(0)} is larger than the model's {rows}")
    return torch.cat([weight, weight.new_zeros(rows - weight.size(0), *weight.shape[1:])])


def weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
        if missing:
            raise MissingFileError(f"{hf_dir}: weight shards listed in {os.path.basename(index)} "
                                    f"are missing: {missing}")
        return [os.path.join(hf_dir, n) for n in names]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise MissingFileError(f"{hf_dir}: no safetensors weights (model.safetensors or "
                            "model.safetensors.index.json)")


def _load_hf_weights(model, weight_files, section):
    """Copy the HF weights into ``model`` tensor by tensor (peak memory: the model + one
    layer's tensors); every Megatron tensor must be written and every HF tensor used."""
    from safetensors import safe_open

    files = {path: safe_open(path, "pt") for path in weight_files}
    where = {name.removeprefix("model."): (handle, name)
             for handle in files.values() for name in handle.keys()}
    used = set()

    def read(name):
        if name not in where:
            raise UserError(f"HF weights lack {name!r} (needed by the {section.family} mapping)")
        used.add(name)
        handle, full_name = where[name]
        return handle.get_tensor(full_name)

    params = model.state_dict()
    written = set()
    with torch.no_grad():
        for name, tensor in megatron_tensors_from_hf(read, section, model.vocab_size):
            params[name].copy_(tensor)
            written.add(name)
    unwritten = sorted(k for k in params if k not in written and not k.endswith("_extra_state"))
    ignorable = ("rotary_emb.inv_freq",) + (
        () if section.untie_embeddings_and_output_weights else ("lm_head.weight",))
    unused = sorted(k for k in set(where) - used if not k.endswith(ignorable))
    if unwritten or unused:
        raise UserError(f"the {section.family} mapping left Megatron tensors {unwritten[:8]} "
                         f"unset and HF tensors {unused[:8]} unused")


def checkpoint_dtype(weight_files: list[str]) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(weight_files[0], "pt") as f:
        name = next(iter(f.keys()))
        dtype = f.get_slice(name).get_dtype()
    return {"BF16": torch.bfloat16, "F32": torch.float32}.get(dtype) or _refuse_dtype(dtype)


def _refuse_dtype(dtype):
    raise UserError(f"HF weights in {dtype} are not supported (bf16 or fp32)")


def _build(config, dtype):
    from megatron_gift.core import model as models

    tf_config = models.transformer_config(config, dtype)
    # Built in host memory, never on a GPU, and not randomly initialised: every tensor is loaded.
    tf_config.use_cpu_initialization, tf_config.perform_initialization = True, False
    vocab = models.padded_vocab_size(config.model.vocab_size, config)
    # The name mapping is written for the local layers (TE checkpoints use the same keys).
    return models.build_chunks(config, tf_config, vocab, torch.device("cpu"), local_spec=True)[0]


def write_replacing(out: str, overwrite: bool, write: Callable[[str], str]) -> str:
    """Run ``write(directory)`` into a private directory beside ``out`` and move the result to
    ``out``; returns ``write``'s path, moved to ``out``. An ``out`` that holds a checkpoint or
    an HF model is refused unless ``overwrite`` (then replaced only once the new one is
    complete); one that holds anything else is always refused: it is nobody's output here."""
    ours = checkpoint.iterations(out) or os.path.isfile(os.path.join(out, checkpoint.TRACKER)) \
        or is_hf_directory(out) or os.path.isfile(os.path.join(out, "adapter_config.json"))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        if not ours:
            raise UserError(f"--out {out} exists and holds other files: give a new or empty "
                            "directory")
        if not overwrite:
            raise UserError(f"--out {out} holds a model already: pass --overwrite to replace "
                            "it, or give another --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.",
                               suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(private, 0o777 & ~umask)  # as os.makedirs would make it, not mkdtemp's 0700
    try:
        written = write(private)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    old = f"{private.removesuffix('.tmp')}.old.tmp"  # private names end in .tmp
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(private, out)
    shutil.rmtree(old, ignore_errors=True)
    return os.path.normpath(os.path.join(out, os.path.relpath(written, private)))


def _run_facts(config, model, source, converter):
    return {"config": OmegaConf.to_container(config), "layout": checkpoint.layout(),
            "architecture": checkpoint.architecture(config.model, model.vocab_size),
            "reference_source": None, "converted_from": source, "converter": converter}


def copy_assets(hf_dir: str, checkpoint_root: str) -> None:
    """Copy the HF directory's config and tokenizer files (no weights) to ``root/hf``.

    A set already there with the same files and contents is left alone (a run saves many
    times, its assets once). Otherwise the files are written to a private directory beside it
    and renamed into place, so an export or an RL hand-off reading ``root/hf`` finds the old
    set or the new one, never a half-written tokenizer."""
    target = os.path.join(checkpoint_root, ASSETS)
    if os.path.abspath(hf_dir) == os.path.abspath(target):
        return
    names = sorted(name for name in os.listdir(hf_dir)
                   if os.path.isfile(os.path.join(hf_dir, name))
                   and not name.endswith(WEIGHT_SUFFIXES))
    if _holds_the_same_files(target, hf_dir, names):
        return
    os.makedirs(checkpoint_root, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f"{ASSETS}.", suffix=".tmp", dir=checkpoint_root)
    try:
        for name in names:
            shutil.copy(os.path.join(hf_dir, name), private)
        _swap_into_place(private, target)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise


def _holds_the_same_files(directory: str, source: str, names: list[str]) -> bool:
    """Whether ``directory`` holds exactly the files ``names`` of ``source``, byte for byte."""
    if not os.path.isdir(directory) or sorted(os.listdir(directory)) != names:
        return False
    return all(filecmp.cmp(os.path.join(source, n), os.path.join(directory, n), shallow=False)
               for n in names)


def _swap_into_place(complete: str, target: str) -> None:
    """Rename the directory ``complete`` to ``target``, replacing what is there (two renames:
    in between, ``target`` is briefly absent rather than ever half-written)."""
    if not os.path.exists(target):
        os.rename(complete, target)
        return
    old = tempfile.mkdtemp(prefix=f"{os.path.basename(target)}.", suffix=".old",
                           dir=os.path.dirname(target))
    os.rename(target, os.path.join(old, "previous"))
    os.rename(complete, target)
    shutil.rmtree(old, ignore_errors=True)


def _bundled_tokenizer():
    from megatron_gift.assets import TOKENIZER_DIR

    return TOKENIZER_DIR


def _cache_key(hf_dir):
    hf_dir = os.path.abspath(hf_dir)
    facts = [hf_dir]
    for name in sorted(os.listdir(hf_dir)):
        stat = os.stat(os.path.join(hf_dir, name))
        facts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]
    return f"{os.path.basename(hf_dir.rstrip(os.sep))}-{digest}"


def pick_converter(choice: str) -> str:
    """``"builtin"`` or ``"bridge"`` for ``choice`` (auto | builtin | bridge); UserError for
    bridge where Megatron-Bridge is not installed."""
    try:
        import megatron.bridge  # noqa: F401
        have_bridge = True
    except ImportError:
        have_bridge = False
    if choice == "auto":
        return "bridge" if have_bridge else "builtin"
    if choice == "bridge" and not have_bridge:
        raise UserError("--converter bridge: Megatron-Bridge (megatron.bridge) is not installed")
    if choice not in ("builtin", "bridge"):
        raise UserError(f"converter must be auto, builtin or bridge, got {choice!r}")
    return choice


def _bridge_load(hf_dir, model):
    from megatron.bridge import AutoBridge

    AutoBridge.from_hf_pretrained(hf_dir).load_hf_weights([model])
