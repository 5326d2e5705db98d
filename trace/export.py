"""The information the tables show, as plain data for `--json`."""
from dataclasses import asdict

from stages.pipelines import PLAIN, Pipeline
from stages.tensor_parallel import SPLIT_DIM
from stages.training_stages import TRAINING_ROLES

from .recorder import TensorRecord, dtype_name
from .run import Trace
from .values import json_number, preview


def _tensor(r: TensorRecord, with_values: bool) -> dict:
    out = {"name": r.name, "role": r.role, "dtype": r.dtype, "symbolic_shape": r.symbolic, "shape": list(r.shape),
           "stats": {k: json_number(v) for k, v in (r.stats or {}).items()}}
    if r.role in TRAINING_ROLES:  # a gradient's or an update's size, as the tables show it
        out["norm"] = json_number(r.norm) if r.norm is not None else None
    if with_values and (corner := preview(r)) is not None:
        index, rows = corner
        out["preview"] = {"index": index, "values": [[json_number(v) for v in row] for row in rows]}
    return out


def _tensor_parallel(trace: Trace) -> dict | None:
    """Of one rank's view: the ranks, the rank, its heads, and the slice of each split weight it holds."""
    if trace.ranks == 1:
        return None
    c, n, r = trace.config, trace.ranks, trace.rank
    whole = {"tok_embeddings": c.vocab_size, "output": c.vocab_size, "wq": c.n_heads * c.head_dim,
             "wk": c.n_kv_heads * c.head_dim, "wv": c.n_kv_heads * c.head_dim, "wo": c.n_heads * c.head_dim,
             "w1": c.ffn_dim, "w3": c.ffn_dim, "w2": c.ffn_dim}
    return {"ranks": n, "rank": r,
            "query_heads": [r * c.n_heads // n, (r + 1) * c.n_heads // n - 1],
            "kv_heads": [r * c.n_kv_heads // n, (r + 1) * c.n_kv_heads // n - 1],
            "weights": {name: {"dim": SPLIT_DIM[name], "from": r * size // n, "to": (r + 1) * size // n - 1}
                        for name, size in whole.items()}}


def trace_to_json(trace: Trace, step: int, layer: int, stage: int | None) -> dict:
    P, T = trace.positions(step)
    chosen = [trace.stage(stage)] if stage else trace.stages
    records = trace.select(step, layer)
    answer = {
        "model": {"name": trace.model_name, "config": asdict(trace.config), "device": trace.device,
                  "dtype": trace.dtype, "source": trace.source},
        "implementation": trace.pipeline, "shapes_only": trace.shapes_only, "prompt": trace.prompt, "chat_template": trace.chat, "sampling": asdict(trace.sampling),
        "prompt_ids": trace.prompt_ids, "pieces": [trace.piece(i) for i in trace.prompt_ids],
        "generated_ids": trace.new_ids,
        "text": trace.text, "steps": trace.n_steps, "seconds": round(trace.seconds, 3),
        "step": step, "layer": layer, "P": P, "T": T,
        "tensor_parallel": _tensor_parallel(trace),
        "training": asdict(trace.training) if trace.training else None,
        "values_kept_in": dtype_name(trace.capture.store_dtype) if trace.capture.store_dtype else trace.dtype,
        "notes": trace.notes,
        "stages": [{"number": s.number, "title": s.title, "short": s.short, "scope": s.scope,
                    "explanation": s.explanation,
                    "tensors": [_tensor(r, with_values=stage is not None)
                                for r in records if r.stage == s.number]} for s in chosen],
    }
    if trace.training is not None:  # no prompt, no generation: the text trained on
        for key in ("prompt", "chat_template", "sampling", "generated_ids", "P", "T", "tensor_parallel"):
            del answer[key]
        answer["text"], answer["token_ids"] = trace.prompt, answer.pop("prompt_ids")
    return answer


def stages_to_json(pipeline: Pipeline = PLAIN) -> list[dict]:
    return [{"number": s.number, "title": s.title, "short": s.short, "scope": s.scope,
             "explanation": s.explanation,
             "tensors": [{"name": t.name, "role": t.role, "symbolic_shape": t.shape} for t in s.tensors]}
            for s in pipeline.stages]
