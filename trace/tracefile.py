"""Trace files: one safetensors file whose header carries a JSON manifest.

Opening one never runs code (safetensors holds raw tensors and a JSON header,
nothing is unpickled). Records that show the same memory (a reshape, a
transpose, the same tensor in two stages) point into one stored block, so
nothing is stored twice.
"""
import json
import platform
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from stages import ModelConfig, Sampling, UserError
from stages.registry import STAGES

from .files import write_output
from .recorder import Capture, Rule, TensorRecord, dtype_name
from .run import Trace

FORMAT, FORMAT_VERSION = "llama-trace", 1


def _versions() -> dict:
    try:
        ours = version("llama-trace")
    except PackageNotFoundError:
        ours = "unknown"
    return {"llama-trace": ours, "torch": torch.__version__, "python": platform.python_version()}


def _capture_json(capture: Capture) -> dict:
    return {"rules": [{k: sorted(v) if v is not None else None for k, v in asdict(rule).items()}
                      for rule in capture.rules],
            "max_bytes": capture.max_bytes,
            "store_dtype": dtype_name(capture.store_dtype) if capture.store_dtype else None}


def _capture_from(data: dict) -> Capture:
    rules = tuple(Rule(**{k: frozenset(v) if v is not None else None for k, v in r.items()}) for r in data["rules"])
    store = getattr(torch, data["store_dtype"]) if data["store_dtype"] else None
    return Capture(rules, data["max_bytes"], store)


def _blocks(records: list[TensorRecord]) -> tuple[dict[str, torch.Tensor], list[dict | None]]:
    """One flat block per piece of kept memory, and where in it each record's values lie."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        if r._values is not None:
            groups.setdefault((r._values.untyped_storage().data_ptr(), r._values.dtype), []).append(i)
    tensors, places = {}, [None] * len(records)
    for n, members in enumerate(groups.values()):
        views = [records[i]._values for i in members]
        lo = min(v.storage_offset() for v in views)
        hi = max(v.storage_offset() + sum((s - 1) * st for s, st in zip(v.shape, v.stride(), strict=True)) + 1
                 for v in views)
        key = f"block{n}"
        tensors[key] = views[0].as_strided((hi - lo,), (1,), lo).cpu().clone()
        for i, v in zip(members, views, strict=True):
            places[i] = {"block": key, "offset": v.storage_offset() - lo, "shape": list(v.shape),
                         "stride": list(v.stride())}
    return tensors, places


def save_trace(trace: Trace, path: Path, force: bool) -> Path:
    tensors, places = _blocks(trace.records)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "model": {"name": trace.model_name, "config": asdict(trace.config), "device": trace.device,
                  "dtype": trace.dtype},
        "prompt": trace.prompt, "chat": trace.chat, "sampling": asdict(trace.sampling),
        "prompt_ids": trace.prompt_ids, "new_ids": trace.new_ids, "text": trace.text, "answer": trace.answer,
        "pieces": {str(k): v for k, v in trace.pieces.items()},
        "capture": _capture_json(trace.capture), "seconds": trace.seconds, "notes": trace.notes,
        "records": [{"step": r.step, "layer": r.layer, "stage": r.stage, "name": r.name, "role": r.role,
                     "symbolic": r.symbolic, "dtype": r.dtype, "shape": list(r.shape),
                     "stats": list(r.stats.values()) if r.stats else None, "values": place}
                    for r, place in zip(trace.records, places, strict=True)],
    }
    header = {FORMAT: json.dumps(manifest, separators=(",", ":"))}
    return write_output(path, save_tensors(tensors, metadata=header), force)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.exists():
        raise UserError(f"trace file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a trace file")
    data = path.read_bytes()
    try:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a trace file, or it is damaged ({str(e).splitlines()[0]})") from None
    if FORMAT not in metadata:
        raise UserError(f"{path} is a safetensors file but not a llama-trace file (it has no trace manifest)")
    try:
        manifest = json.loads(metadata[FORMAT])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its trace manifest is damaged ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported trace format {manifest.get('format')!r} "
                        f"version {manifest.get('version')!r} (this tool reads version {FORMAT_VERSION})")
    return manifest, tensors


def _values(entry: dict, place: dict | None, tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor | None:
    if place is None:
        return None
    block = tensors.get(place["block"])
    shape, stride, offset = place["shape"], place["stride"], place["offset"]
    if block is None or len(shape) != len(stride) or offset < 0 or min(stride, default=0) < 0:
        raise UserError(f"damaged trace file: the values of {where} are missing or misplaced")
    extent = offset + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1 if all(shape) else 0
    if extent > block.numel():
        raise UserError(f"damaged trace file: the values of {where} lie beyond their block")
    full = list(entry["shape"])
    if (entry["role"] != "weight" and shape != full) or len(shape) != len(full) or \
            any(s > f for s, f in zip(shape, full, strict=True)):
        raise UserError(f"damaged trace file: {where} says its shape is {tuple(full)} but its values are "
                        f"{tuple(shape)}")
    return block.as_strided(shape, stride, offset)


def load_trace(path: Path) -> Trace:
    """A trace file as a Trace, with every check a file from elsewhere needs."""
    manifest, tensors = _read(path)
    try:
        records = []
        for entry in manifest["records"]:
            where = f"stage {entry['stage']} {entry['name']!r} (step {entry['step']}, layer {entry['layer']})"
            if not 1 <= entry["stage"] <= len(STAGES):
                raise UserError(f"damaged trace file: {where} names no stage")
            records.append(TensorRecord(
                step=entry["step"], layer=entry["layer"], stage=entry["stage"], name=entry["name"],
                role=entry["role"], symbolic=entry["symbolic"], dtype=entry["dtype"], shape=tuple(entry["shape"]),
                _stats=torch.tensor(entry["stats"], dtype=torch.float64) if entry["stats"] else None,
                _values=_values(entry, entry["values"], tensors, where)))
        model = manifest["model"]
        return Trace(model_name=model["name"], config=ModelConfig(**model["config"]), device=model["device"],
                     dtype=model["dtype"], prompt=manifest["prompt"], chat=manifest["chat"],
                     sampling=Sampling(**manifest["sampling"]), prompt_ids=manifest["prompt_ids"],
                     new_ids=manifest["new_ids"], text=manifest["text"], answer=manifest["answer"],
                     pieces={int(k): v for k, v in manifest["pieces"].items()}, records=records,
                     capture=_capture_from(manifest["capture"]), seconds=manifest["seconds"],
                     notes=manifest["notes"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"damaged trace file {path}: its manifest is incomplete ({type(e).__name__}: {e})") from None
