"""The trace manifest's schema: a trace file may come from anywhere, so every field is checked
for its type and its range before anything is built from it.

A schema is written as Python values: a type (int, float, str, bool), None for JSON null, a
tuple of alternatives, [item] for a list of items, {key: schema} for an object with exactly
those keys, and Map(key, value) for an object with any keys.
"""
import math
from dataclasses import dataclass

from stages import UserError


@dataclass(frozen=True)
class Map:
    keys: object
    values: object


RANGES = [[int]]  # [[lo, hi], ...]
RULE = {"stages": (RANGES, None), "steps": (RANGES, None), "layers": (RANGES, None)}
PLACE = {"block": str, "offset": int, "shape": [int], "stride": [int]}
RECORD = {"step": (int, None), "layer": (int, None), "stage": int, "name": str, "role": str, "symbolic": str,
          "dtype": str, "shape": [int], "stats": ([float], None), "values": (PLACE, None), "rank": int}
TRAINING = {"setup": {"batch": int, "seq": int, "steps": int, "lr": float, "weight_decay": float, "clip": (float, None),
                      "same_batch": bool},
            "steps": [{"loss": float, "grad_norm": float, "offset": int}]}
MANIFEST = {
    "format": str, "version": int, "created": str, "versions": Map(str, str),
    "model": {"name": str, "config": {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
                                      "vocab_size": int, "ffn_dim": int, "norm_eps": float, "rope_theta": float,
                                      "max_seq_len": int},
              "device": str, "dtype": str, "source": str},
    "implementation": str, "prompt": str, "chat": bool,
    "sampling": {"temperature": float, "top_k": int, "top_p": float, "seed": (int, None)},
    "prompt_ids": [int], "new_ids": [int], "text": str, "answer": str, "pieces": Map(str, str),
    "capture": {"rules": [RULE], "max_bytes": (int, None), "store_dtype": (str, None)},
    "seconds": float, "notes": [str], "records": [RECORD], "ranks": int, "training": (TRAINING, None),
}
INT_LIMIT = 2**62  # JSON integers beyond this are no honest count, offset or size
MAX_SHOWN_NUMEL = 2**28  # a repeated view is made whole to be shown: at most 1 GiB of float32


def _fits(value, schema) -> bool:
    if schema is None:
        return value is None
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT
    if schema is float:  # statistics may be inf or nan (masked scores); JSON writes those too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(schema, type):
        return isinstance(value, schema)
    if isinstance(schema, tuple):
        return any(_fits(value, s) for s in schema)
    if isinstance(schema, list):
        return isinstance(value, list)
    if isinstance(schema, (dict, Map)):
        return isinstance(value, dict)
    raise TypeError(schema)


def check(value, schema, where: str = "the manifest") -> None:
    """Raise UserError naming the first place where `value` does not follow `schema`."""
    if isinstance(schema, tuple):
        for option in schema:
            if _fits(value, option):
                return check(value, option, where)
        raise UserError(f"damaged trace file: {where} has the wrong type ({type(value).__name__})")
    if not _fits(value, schema):
        raise UserError(f"damaged trace file: {where} has the wrong type ({type(value).__name__})")
    if isinstance(schema, list):
        for i, item in enumerate(value):
            check(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, dict):
        if set(value) != set(schema):
            odd = sorted(set(value) ^ set(schema))[0]
            raise UserError(f"damaged trace file: {where} {'lacks' if odd in schema else 'has an unknown'} "
                            f"field {odd!r}")
        for key, sub in schema.items():
            check(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, Map):
        for key, item in value.items():
            check(key, schema.keys, f"a key of {where}")
            check(item, schema.values, f"{where}[{key!r}]")


def _grouped_split(shape: list[int], stride: list[int], full_shape: list[int], n_rep: int) -> bool:
    """`shape` is `full_shape` with one dimension H split into (Hkv, n_rep), n_rep on a zero stride:
    (S, Hkv, n_rep, Dh) for (S, H, Dh), as grouped-query attention's repeated keys are kept."""
    return len(shape) == len(full_shape) + 1 and any(
        shape[:d] == full_shape[:d] and shape[d + 2:] == full_shape[d + 1:] and shape[d + 1] == n_rep
        and (stride[d + 1] == 0 or n_rep == 1) and shape[d] * n_rep == full_shape[d] for d in range(len(full_shape)))


def check_placement(place: dict, block_numel: int, full_shape: list[int], weight: bool, grouped: bool, n_rep: int,
                    where: str) -> None:
    """Values lie inside their block and do not overlap themselves, except for the one repetition
    grouped-query attention makes (a KV head shown n_rep times, on a zero stride, in the records
    that registry.GROUPED names): so a view never shows more than n_rep times the elements the file
    stores, and never more than MAX_SHOWN_NUMEL (a huge shape on zero strides would otherwise
    render gigabytes from a few bytes)."""
    shape, stride, offset = place["shape"], place["stride"], place["offset"]
    if len(shape) != len(stride) or offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0:
        raise UserError(f"damaged trace file: the values of {where} are misplaced")
    split = grouped and _grouped_split(shape, stride, full_shape, n_rep)  # see stages.hooks.record
    if not split and (len(shape) != len(full_shape) or (not weight and shape != full_shape)
                      or any(s > f for s, f in zip(shape, full_shape, strict=True))):
        raise UserError(f"damaged trace file: {where} says its shape is {tuple(full_shape)} but its values "
                        f"are {tuple(shape)}")
    if grouped and math.prod(full_shape) > MAX_SHOWN_NUMEL:
        raise UserError(f"damaged trace file: {where} would take more than {MAX_SHOWN_NUMEL:,} numbers to show")
    if math.prod(shape) == 0:
        return
    repeated = math.prod(size for size, step in zip(shape, stride, strict=True) if step == 0)
    if repeated > (n_rep if grouped else 1):
        raise UserError(f"damaged trace file: the values of {where} repeat more than grouped-query attention does")
    reach = 0  # the furthest element of the dimensions seen so far, smallest stride first
    moving = (d for d in zip(shape, stride, strict=True) if d[0] > 1 and d[1] > 0)
    for size, step in sorted(moving, key=lambda d: d[1]):
        if step <= reach:
            raise UserError(f"damaged trace file: the values of {where} overlap themselves")
        reach += (size - 1) * step
    if offset + reach >= block_numel:
        raise UserError(f"damaged trace file: the values of {where} lie beyond their block")
