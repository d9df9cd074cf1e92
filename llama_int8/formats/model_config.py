"""A model configuration checked before anything is built: every format reader hands its settings
here under the names its file uses, and gets a ModelArgs or a CheckpointError naming the file, the
key and the value.

    args = model_args_from(path, {"dim": ("hidden_size", cfg.get("hidden_size")), ...})

Checked: types (an integer where one belongs, never a bool or a float for it), signs, bounds beyond
any released model (a config of millions of layers fails here at once, not after minutes of
building), n_heads dividing the width unless head_dim is given, n_kv_heads dividing n_heads, even
head sizes, and rope_scaling's type and required fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model import ModelArgs
from .common import CheckpointError

# Bounds well beyond every released LLaMA-family model (the largest: 126 layers, width 16384,
# 128 heads, a 256k vocabulary): a value past them is a broken file, not a bigger model.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 18
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 30
MAX_EXPERTS = 1024  # feed-forward experts per block (Mixtral has 8, the largest released MoEs a few hundred)
ROPE_TYPES = {  # rope type -> its required fields, as transformers' rope validation has them
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

Setting = tuple[str, Any]  # (the key as the file names it, its value; None when absent)
Check = Callable[[Path, str, Any], Any]


def integer(low: int, high: int) -> Check:
    def check(path: Path, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{path}: {key}={value!r}: expected an integer from {low} to {high}")
        return value

    return check


def number(low: float, high: float = math.inf) -> Check:
    """A finite number in the open interval (low, high)."""
    def check(path: Path, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and low < value < high):
            bound = f"> {low}" if high == math.inf else f"between {low} and {high} (exclusive)"
            raise CheckpointError(f"{path}: {key}={value!r}: expected a finite number {bound}")
        return float(value)

    return check


def boolean(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: {key}={value!r}: expected true or false")
    return value


FIELD_CHECKS: dict[str, Check] = {
    "dim": integer(1, MAX_WIDTH), "n_layers": integer(1, MAX_LAYERS), "n_heads": integer(1, MAX_HEADS),
    "n_kv_heads": integer(1, MAX_HEADS), "vocab_size": integer(1, MAX_VOCAB), "head_dim": integer(1, MAX_HEAD_DIM),
    "multiple_of": integer(1, MAX_WIDTH), "ffn_dim_multiplier": number(0), "hidden_dim": integer(1, MAX_WIDTH),
    "norm_eps": number(0, 1), "rope_theta": number(0), "tie_word_embeddings": boolean,
    "sliding_window": integer(1, MAX_POSITIONS), "max_position_embeddings": integer(1, MAX_POSITIONS),
    "qkv_bias": boolean, "qk_norm": boolean,
    "n_experts": integer(0, MAX_EXPERTS), "experts_per_token": integer(0, MAX_EXPERTS),
}
REQUIRED_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size")


def model_args_from(path: Path, settings: dict[str, Setting]) -> ModelArgs:
    """ModelArgs from a file's settings (ModelArgs field -> (key, value)); absent optional settings
    (None) take ModelArgs' defaults. Raises CheckpointError naming path, key and value."""
    absent = [field for field in REQUIRED_FIELDS if field not in settings]
    if absent:
        raise CheckpointError(f"{path}: missing required settings {absent}")
    values: dict[str, Any] = {}
    for field, (key, value) in settings.items():
        if field == "rope_scaling":
            values[field] = checked_rope_scaling(path, key, value)
        elif field not in FIELD_CHECKS:
            values[field] = value  # a setting ModelArgs checks itself (below)
        elif value is not None or field in REQUIRED_FIELDS:
            values[field] = FIELD_CHECKS[field](path, key, value)
    check_heads(path, settings, values)
    check_experts(path, settings, values)
    try:
        return ModelArgs(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def check_heads(path: Path, settings: dict[str, Setting], values: dict[str, Any]) -> None:
    """The width splits into whole, even heads, and the key/value heads into equal groups."""
    def key(field: str) -> str:
        return settings.get(field, (field, None))[0]

    dim, n_heads = values["dim"], values["n_heads"]
    head_dim = values.get("head_dim")
    if head_dim is None:
        if dim % n_heads:
            raise CheckpointError(f"{path}: {key('dim')}={dim} is not a multiple of {key('n_heads')}={n_heads}, "
                                  f"and no {key('head_dim')} gives the head size")
        head_dim = dim // n_heads
        if head_dim % 2:
            raise CheckpointError(f"{path}: {key('dim')}={dim} / {key('n_heads')}={n_heads} gives heads of "
                                  f"{head_dim} dimensions; rotary embeddings need an even head size")
    elif head_dim % 2:
        raise CheckpointError(f"{path}: {key('head_dim')}={head_dim}: rotary embeddings need an even head size")
    n_kv_heads = values.get("n_kv_heads")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise CheckpointError(f"{path}: {key('n_heads')}={n_heads} is not a multiple of "
                              f"{key('n_kv_heads')}={n_kv_heads}: query heads must share key/value heads evenly")


def check_experts(path: Path, settings: dict[str, Setting], values: dict[str, Any]) -> None:
    """A mixture of experts routes each token to at least one of its experts and at most all of them."""
    n_experts, per_token = values.get("n_experts"), values.get("experts_per_token")  # None: not given
    if n_experts and (per_token is None or not 1 <= per_token <= n_experts):
        key = settings.get("experts_per_token", ("experts_per_token", None))[0]
        raise CheckpointError(f"{path}: {key}={per_token}: expected from 1 to the {n_experts} experts of "
                              f"{settings['n_experts'][0]}")


def checked_rope_scaling(path: Path, key: str, value: Any) -> dict:
    """rope_scaling of a type the model computes, with its required fields and positive factors."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {key}={value!r}: expected an object such as "
                              '{"rope_type": "linear", "factor": 2.0}')
    kind = value.get("rope_type", value.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{path}: {key}.rope_type={kind!r} is not supported; supported: "
                              f"{', '.join(ROPE_TYPES)}")
    missing = [f for f in ROPE_TYPES[kind] if f not in value]
    if missing:
        raise CheckpointError(f"{path}: {key} of type {kind!r} lacks {', '.join(missing)}")
    for field in ROPE_TYPES[kind]:
        check = integer(1, MAX_POSITIONS) if field == "original_max_position_embeddings" else number(0)
        check(path, f"{key}.{field}", value[field])
    if kind == "llama3" and not value["high_freq_factor"] > value["low_freq_factor"]:
        raise CheckpointError(f"{path}: {key}.high_freq_factor={value['high_freq_factor']!r} must exceed "
                              f"{key}.low_freq_factor={value['low_freq_factor']!r}")
    return value
