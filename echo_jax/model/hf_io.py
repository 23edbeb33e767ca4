"""A Hugging Face checkpoint folder <-> an `HFDecoder`'s graph and parameters.

Loading reads `config.json` and the `*.safetensors` files (one, or several listed by
`model.safetensors.index.json`) one tensor at a time, straight into the arrays of the
parameter pytree: the host holds the model once plus one tensor in flight, never a second full
copy. Saving writes the same layout back (sharded above `max_shard_bytes`) with the config, in
the checkpoint's dtype, so `transformers` loads it (`from_pretrained`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Sharding
from safetensors import safe_open
from safetensors.flax import save_file

from echo_jax.model.hf import HFDecoder
from echo_jax.model.hf_config import HFConfig, read_config
from echo_jax.util.choices import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a checkpoint folder copied alongside a saved model (tokenizer and chat template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder (its config.json names a model_type), not a run."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def _path_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """A parameter's pure-dict path -> (its checkpoint tensor name, whether it is transposed:
    nnx.Linear's kernel is [in, out], a torch Linear's weight [out, in])."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if parts[:2] == ["embed_tokens", "embedding"]:
        return "model.embed_tokens.weight", False
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    name = "model." + ".".join(parts[:-1]) + ".weight"
    return name, leaf == "kernel"


def abstract_decoder(cfg: HFConfig, attention: str = "auto") -> tuple[nnx.GraphDef, Any]:
    """The decoder's graph and its parameters' shapes (nothing initialised)."""
    abstract = nnx.eval_shape(lambda: HFDecoder(cfg, attention, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def init_decoder(cfg: HFConfig, seed: int, attention: str = "auto") -> tuple[nnx.GraphDef, Any]:
    """A randomly initialised decoder (benchmarks, tests): graph and parameters."""
    graphdef, state = nnx.split(HFDecoder(cfg, attention, rngs=nnx.Rngs(seed)))
    return graphdef, nnx.to_pure_dict(state)


def _tensor_files(folder: str) -> dict[str, str]:
    """Each tensor name -> the file holding it."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="flax") as f:
        return dict.fromkeys(f.keys(), single)


def load_params(folder: str, cfg: HFConfig, template: Any, sharding: Sharding | None = None):
    """The parameters of `template` (a pure dict of shapes) read from the folder's safetensors,
    each cast to float32 and placed by `sharding` (default: the default device) as read."""
    files = _tensor_files(folder)
    wanted = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(template):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        wanted[_path_name(keys)[0]] = (keys, leaf)
    # transformers ties by dropping lm_head.weight; some checkpoints store it anyway.
    spare = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unused = sorted(set(files) - set(wanted) - spare)
    if unused:
        raise ConfigError(f"checkpoint tensor {unused[0]} has no place in a {cfg.model_type} "
                          f"decoder of this config ({len(unused)} such tensors)")  # fmt: skip
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise ConfigError(f"checkpoint {folder} lacks tensor {missing[0]} "
                          f"({len(missing)} missing)")  # fmt: skip
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out: dict[tuple, Any] = {}
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="flax") as f:
            for name in names:
                keys, leaf = wanted[name]
                x = f.get_tensor(name)
                if _path_name(keys)[1]:
                    x = x.T
                if x.shape != leaf.shape:
                    raise ConfigError(f"checkpoint tensor {name} has shape {x.shape}, the "
                                      f"config gives {leaf.shape}")  # fmt: skip
                out[keys] = jax.device_put(x.astype(jnp.float32), sharding)
                del x
    return _unflatten(template, out)


def _unflatten(template: Any, leaves: dict[tuple, Any]) -> Any:
    def build(node: Any, prefix: tuple) -> Any:
        if isinstance(node, dict):
            return {k: build(v, (*prefix, k)) for k, v in node.items()}
        return leaves[prefix]

    return build(template, ())


def load_hf(
    folder: str | os.PathLike,
    dtype: str | None = None,
    attention: str = "auto",
    sharding: Sharding | None = None,
) -> tuple[HFConfig, nnx.GraphDef, Any]:
    """(config, graph, float32 parameters) of a checkpoint folder; `dtype` overrides the
    compute dtype the checkpoint names."""
    folder = os.fspath(folder)
    cfg = read_config(folder, dtype)
    graphdef, template = abstract_decoder(cfg, attention)
    return cfg, graphdef, load_params(folder, cfg, template, sharding)


def save_hf(
    folder: str | os.PathLike,
    cfg: HFConfig,
    params: Any,
    source: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes params as a checkpoint folder in the config's dtype (sharded with an index past
    max_shard_bytes), its config.json, and the tokenizer files of `source` if given."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    dtype = jnp.dtype(cfg.dtype)
    tensors: list[tuple[str, Any]] = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name, transpose = _path_name(keys)
        tensors.append((name, (leaf.T if transpose else leaf, dtype)))
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, (x, _) in sorted(tensors, key=lambda t: _natural(t[0])):
        nbytes = x.size * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, x))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")  # fmt: skip
        arrays = {name: jnp.asarray(x, dtype) for name, x in shard}
        save_file(arrays, os.path.join(folder, file), metadata={"format": "pt"})
        for name, x in arrays.items():
            weight_map[name] = file
            total += x.size * dtype.itemsize
        del arrays
    stale = os.path.join(folder, INDEX_FILE)
    if len(shards) > 1:
        with open(stale, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(stale):
        os.remove(stale)
    raw = dict(cfg.raw)
    raw["torch_dtype"] = cfg.dtype
    raw.pop("dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    if source is not None and os.path.abspath(source) != os.path.abspath(folder):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(folder, name))


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def to_numpy(params: Any) -> Any:
    return jax.tree.map(np.asarray, params)
