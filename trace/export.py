"""The information the tables show, as plain data for `--json`."""
from dataclasses import asdict

from stages.pipelines import PLAIN, Pipeline

from .recorder import TensorRecord
from .run import Trace
from .values import json_number, preview


def _tensor(r: TensorRecord, with_values: bool) -> dict:
    out = {"name": r.name, "role": r.role, "dtype": r.dtype, "symbolic_shape": r.symbolic, "shape": list(r.shape),
           "stats": {k: json_number(v) for k, v in (r.stats or {}).items()}}
    if with_values and (corner := preview(r)) is not None:
        index, rows = corner
        out["preview"] = {"index": index, "values": [[json_number(v) for v in row] for row in rows]}
    return out


def trace_to_json(trace: Trace, step: int, layer: int, stage: int | None) -> dict:
    P, T = trace.positions(step)
    chosen = [trace.stage(stage)] if stage else trace.stages
    records = trace.select(step, layer)
    return {
        "model": {"name": trace.model_name, "config": asdict(trace.config), "device": trace.device,
                  "dtype": trace.dtype, "source": trace.source},
        "implementation": trace.pipeline, "shapes_only": trace.shapes_only, "prompt": trace.prompt, "chat_template": trace.chat, "sampling": asdict(trace.sampling),
        "prompt_ids": trace.prompt_ids, "pieces": [trace.piece(i) for i in trace.prompt_ids],
        "generated_ids": trace.new_ids,
        "text": trace.text, "steps": trace.n_steps, "seconds": round(trace.seconds, 3),
        "step": step, "layer": layer, "P": P, "T": T,
        "tensor_parallel": {"ranks": trace.ranks, "rank": trace.rank} if trace.ranks > 1 else None,
        "stages": [{"number": s.number, "title": s.title, "short": s.short, "scope": s.scope,
                    "explanation": s.explanation,
                    "tensors": [_tensor(r, with_values=stage is not None)
                                for r in records if r.stage == s.number]} for s in chosen],
    }


def stages_to_json(pipeline: Pipeline = PLAIN) -> list[dict]:
    return [{"number": s.number, "title": s.title, "short": s.short, "scope": s.scope,
             "explanation": s.explanation,
             "tensors": [{"name": t.name, "role": t.role, "symbolic_shape": t.shape} for t in s.tensors]}
            for s in pipeline.stages]
