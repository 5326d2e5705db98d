"""Trace files: one safetensors file whose header carries a JSON manifest.

Opening one never runs code (safetensors holds raw tensors and a JSON header,
nothing is unpickled). Records that show the same memory (a reshape, a
transpose, the same tensor in two stages) point into one stored block, so
nothing is stored twice. The file is written block by block straight from the
kept tensors (no copy of the trace is built in memory), and read back with
every field of the manifest checked (trace.manifest): a file may come from anywhere.
"""
import json
import platform
import struct
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from stages import ModelConfig, Sampling, UserError
from stages.inputs import regular_file
from stages.pipelines import N_STAGES, PIPELINES
from stages.tensor_parallel import MAX_RANKS
from stages.registry import Stage
from stages.training import StepResult, TrainingSetup

from .files import output_file
from .manifest import MANIFEST, check, check_placement
from .recorder import CORNERED, STAT_NAMES, Capture, Ranges, Rule, TensorRecord, dtype_name
from .run import Trace, TrainingLog

FORMAT, FORMAT_VERSION = "llama-trace", 7
# Tensors that versions 1 and 2 called by names now used for other tensors (or by none).
RENAMED_IN_V3 = {(14, "output"): "head outputs", (14, "output (transposed)"): "heads merged",
                 (19, "h"): "out", (19, "normalized h"): "normalized out"}
READS = (1, 2, 3, 4, 5, 6, 7)  # version 4 added the model's source, 5 the implementation, 6 the ranks, 7 training
STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "C64": torch.complex64}
STORED_NAME = {dtype: name for name, dtype in STORED.items()}
MAX_HEADER = 1 << 30  # a header (mostly the manifest) larger than this is no trace file of ours
ALIGN = 8


def _versions() -> dict:
    try:
        ours = version("llama-trace")
    except PackageNotFoundError:
        ours = "unknown"
    return {"llama-trace": ours, "torch": torch.__version__, "python": platform.python_version()}


def _capture_json(capture: Capture) -> dict:
    return {"rules": [{axis: [list(span) for span in ranges.spans] if ranges is not None else None
                       for axis, ranges in vars(rule).items()} for rule in capture.rules],
            "max_bytes": capture.max_bytes,
            "store_dtype": dtype_name(capture.store_dtype) if capture.store_dtype else None}


def _capture_from(data: dict) -> Capture:
    rules = []
    for rule in data["rules"]:
        axes = {}
        for axis, spans in rule.items():
            if spans is not None and any(len(span) != 2 or not 0 <= span[0] <= span[1] for span in spans):
                raise UserError(f"damaged trace file: a capture rule's {axis} are not ranges")
            axes[axis] = Ranges(tuple(map(tuple, spans))) if spans is not None else None
        rules.append(Rule(**axes))
    store = data["store_dtype"]
    if store not in (None, "float16", "bfloat16", "float32"):
        raise UserError(f"damaged trace file: unknown stored dtype {store!r}")
    return Capture(tuple(rules), data["max_bytes"], getattr(torch, store) if store else None)


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
        tensors[key] = views[0].as_strided((hi - lo,), (1,), lo)  # written from where it lies, not copied
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
                  "dtype": trace.dtype, "source": trace.source},
        "implementation": trace.pipeline, "prompt": trace.prompt, "chat": trace.chat, "sampling": asdict(trace.sampling),
        "prompt_ids": trace.prompt_ids, "new_ids": trace.new_ids, "text": trace.text, "answer": trace.answer,
        "pieces": {str(k): v for k, v in trace.pieces.items()},
        "capture": _capture_json(trace.capture), "seconds": trace.seconds, "notes": trace.notes,
        "records": [{"step": r.step, "layer": r.layer, "stage": r.stage, "name": r.name, "role": r.role,
                     "symbolic": r.symbolic, "dtype": r.dtype, "shape": list(r.shape),
                     "stats": list(r.stats.values()) if r.stats else None, "values": place, "rank": r.rank}
                    for r, place in zip(trace.records, places, strict=True)],
        "ranks": trace.ranks,
        "training": asdict(trace.training) if trace.training else None,
    }
    header, offset = {"__metadata__": {FORMAT: json.dumps(manifest, separators=(",", ":"))}}, 0
    for key, block in tensors.items():
        size = block.numel() * block.element_size()
        header[key] = {"dtype": STORED_NAME[block.dtype], "shape": [block.numel()], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)  # safetensors pads its header to 8 bytes
    with output_file(path, force) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for block in tensors.values():  # one block at a time, from the trace's own memory
            f.write(block.cpu().contiguous().view(torch.uint8).numpy().data)
    return path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    regular_file(path, "trace file")
    size = path.stat().st_size
    damaged = f"{path} is not a trace file, or it is damaged"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{damaged} (it is only {size} bytes long)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            raise UserError(f"{damaged} (its header claims {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{damaged} (its header is not JSON: {e})") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise UserError(f"{damaged} (its header is not a safetensors header)")
        metadata = header.pop("__metadata__", {})
        if FORMAT not in metadata:
            raise UserError(f"{path} is a safetensors file but not a llama-trace file (it has no trace manifest)")
        try:
            manifest = json.loads(metadata[FORMAT])
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: its trace manifest is damaged ({e})") from None
        if not isinstance(manifest, dict):
            raise UserError(f"{path}: its trace manifest is damaged (not a JSON object)")
        if manifest.get("format") != FORMAT or manifest.get("version") not in READS:
            raise UserError(f"{path}: unsupported trace format {manifest.get('format')!r} "
                            f"version {manifest.get('version')!r} "
                            f"(this tool reads versions {READS[0]} to {READS[-1]})")
        return manifest, _read_blocks(f, header, 8 + header_len, size, damaged)


def _read_blocks(f, header: dict, start: int, size: int, damaged: str) -> dict[str, torch.Tensor]:
    """Each stored block, checked to lie inside the file, read straight into its tensor."""
    tensors = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in STORED or \
                not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2 or \
                not all(isinstance(v, int) and v >= 0 for v in entry["data_offsets"]):
            raise UserError(f"{damaged} (block {key!r} is described wrongly)")
        lo, hi = entry["data_offsets"]
        dtype = STORED[entry["dtype"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not lo <= hi <= size - start or (hi - lo) % itemsize:
            raise UserError(f"{damaged} (block {key!r} lies outside the file)")
        block = torch.empty(hi - lo, dtype=torch.uint8)
        f.seek(start + lo)
        if f.readinto(block.numpy()) != hi - lo:
            raise UserError(f"{damaged} (block {key!r} is cut short)")
        tensors[key] = block.view(dtype)
    return tensors


def _v1_rules(manifest: dict) -> None:
    """Version 1 held each rule's stages, steps and layers as lists of numbers: make them ranges."""
    rules = manifest.get("capture", {}).get("rules") if isinstance(manifest.get("capture"), dict) else None
    for rule in rules if isinstance(rules, list) else []:
        for axis, values in rule.items() if isinstance(rule, dict) else []:
            if isinstance(values, list):
                rule[axis] = [[v, v] for v in values]


def _record(entry: dict, tensors: dict[str, torch.Tensor], n_steps: int, config: ModelConfig,
            stages: tuple[Stage, ...], ranks: int) -> TensorRecord:
    """One record of the manifest, each field checked against the registry and the run."""
    where = f"stage {entry['stage']} {entry['name']!r} (step {entry['step']}, layer {entry['layer']})"
    if not 1 <= entry["stage"] <= N_STAGES:
        raise UserError(f"damaged trace file: {where} names no stage")
    spec = next((t for t in stages[entry["stage"] - 1].tensors if t.name == entry["name"]), None)
    if spec is None or spec.role != entry["role"]:
        raise UserError(f"damaged trace file: {where} is no tensor of that stage")
    if not 0 <= entry["rank"] < ranks:
        raise UserError(f"damaged trace file: {where} comes from rank {entry['rank']} of a run on {ranks}")
    if entry["step"] is not None and not 0 <= entry["step"] < max(n_steps, 1) or \
            entry["layer"] is not None and not 0 <= entry["layer"] < config.n_layers:
        raise UserError(f"damaged trace file: {where} lies outside the run")
    if len(entry["shape"]) > 8 or min(entry["shape"], default=0) < 0:
        raise UserError(f"damaged trace file: {where} has an impossible shape {entry['shape']}")
    if entry["stats"] is not None and len(entry["stats"]) != len(STAT_NAMES):
        raise UserError(f"damaged trace file: {where} has {len(entry['stats'])} statistics")
    if entry["dtype"] not in {dtype_name(d) for d in STORED.values()}:
        raise UserError(f"damaged trace file: {where} has an unknown dtype {entry['dtype']!r}")
    values, place = None, entry["values"]
    if place is not None:
        block = tensors.get(place["block"])
        if block is None:
            raise UserError(f"damaged trace file: the values of {where} are missing")
        check_placement(place, block.numel(), entry["shape"], spec.role in CORNERED, spec.grouped, config.n_rep,
                        where)
        values = block.as_strided(place["shape"], place["stride"], place["offset"])
    return TensorRecord(step=entry["step"], layer=entry["layer"], stage=entry["stage"], name=entry["name"],
                        role=entry["role"], symbolic=entry["symbolic"], dtype=entry["dtype"],
                        shape=tuple(entry["shape"]), rank=entry["rank"],
                        _stats=torch.tensor(entry["stats"], dtype=torch.float64) if entry["stats"] else None,
                        _values=values)


def _training_from(data: dict | None, n_tokens: int, path: Path) -> TrainingLog | None:
    """The training run's setup and steps, checked: every batch lies inside the text's stream."""
    if data is None:
        return None
    try:
        setup = TrainingSetup(**data["setup"])
    except UserError as e:
        raise UserError(f"damaged trace file {path}: {e}") from None
    steps = [StepResult(**step) for step in data["steps"]]
    if len(steps) != setup.steps or any(not 0 <= s.offset <= n_tokens - setup.tokens_per_step - 1 for s in steps):
        raise UserError(f"damaged trace file {path}: its training steps do not fit its text")
    return TrainingLog(setup, steps)


def load_trace(path: Path) -> Trace:
    """A trace file as a Trace, with every check a file from elsewhere needs."""
    manifest, tensors = _read(path)
    if manifest["version"] == 1:
        _v1_rules(manifest)
    if manifest["version"] < 4 and isinstance(manifest.get("model"), dict):
        manifest["model"].setdefault("source", "")
    if manifest["version"] < 5:
        manifest.setdefault("implementation", "plain")
    if manifest["version"] < 7:
        manifest.setdefault("training", None)
    if manifest["version"] < 6:
        manifest.setdefault("ranks", 1)
        for entry in manifest.get("records", []) if isinstance(manifest.get("records"), list) else []:
            if isinstance(entry, dict):
                entry.setdefault("rank", 0)
    check(manifest, MANIFEST)
    if manifest["implementation"] not in PIPELINES:
        raise UserError(f"damaged trace file {path}: it names no implementation we know "
                        f"({manifest['implementation']!r}; known: {', '.join(PIPELINES)})")
    if manifest["version"] < 3:
        for entry in manifest["records"]:
            entry["name"] = RENAMED_IN_V3.get((entry["stage"], entry["name"]), entry["name"])
    model = manifest["model"]
    try:
        config = ModelConfig(**model["config"])
        sampling = Sampling(**manifest["sampling"])
    except (ValueError, UserError) as e:
        raise UserError(f"damaged trace file {path}: {e}") from None
    training = _training_from(manifest["training"], len(manifest["prompt_ids"]), path)
    n_steps = len(training.steps) if training else len(manifest["new_ids"])
    if not all(0 <= i < config.vocab_size for i in manifest["prompt_ids"] + manifest["new_ids"]) or \
            not all(key.isdigit() for key in manifest["pieces"]):
        raise UserError(f"damaged trace file {path}: its token ids do not fit its vocabulary")
    stages = PIPELINES[manifest["implementation"]].stages
    if not 1 <= manifest["ranks"] <= MAX_RANKS:
        raise UserError(f"damaged trace file {path}: it claims a run on {manifest['ranks']} ranks")
    records = [_record(entry, tensors, n_steps, config, stages, manifest["ranks"]) for entry in manifest["records"]]
    return Trace(model_name=model["name"], config=config, device=model["device"], dtype=model["dtype"],
                 prompt=manifest["prompt"], chat=manifest["chat"], sampling=sampling,
                 prompt_ids=manifest["prompt_ids"], new_ids=manifest["new_ids"], text=manifest["text"],
                 answer=manifest["answer"], pieces={int(k): v for k, v in manifest["pieces"].items()},
                 records=records, capture=_capture_from(manifest["capture"]), seconds=manifest["seconds"],
                 notes=manifest["notes"], source=model["source"], pipeline=manifest["implementation"],
                 ranks=manifest["ranks"], training=training)
