"""How many bytes a capture policy will keep, said before the run, from the stage
registry's symbolic shapes: views of another tensor's memory (registry `view_of`)
cost nothing, and each layer's KV cache is one block of (S, Hkv, Dh)."""
import math

import torch

from stages import ModelConfig
from stages.registry import STAGES, Stage

from .recorder import Capture

INTEGER = {"token ids", "tokens", "tokens[P:P+T]", "next token"}
COMPLEX = {"xq (complex)", "xk (complex)"}
FLOAT32 = {"logits", "probs", "mask"}


def _numel(symbolic: str, sizes: dict[str, int]) -> int:
    dims = [d.strip() for d in symbolic.strip("()").split(",") if d.strip()]
    # The registry's shapes use the letters of stages.config, '·' for products and '/' for halves.
    return math.prod(eval(d.replace("·", "*").replace("/", "//"), {"__builtins__": {}}, sizes) for d in dims)


def _memory_of(stage: Stage, name: str, layer: int | None) -> tuple[int, str, int | None]:
    """(stage, tensor, layer) that first made the memory a record shows: views lead to what they
    view, inputs to the latest earlier stage that made a tensor of that name."""
    spec = stage.spec(name)
    if spec.view_of == "out":  # the block's input: the output of the block before, or the embeddings
        return (18, "out", layer - 1) if layer else (4, "x", None)
    if spec.view_of and spec.view_of != name and spec.view_of in {t.name for t in stage.tensors}:
        return _memory_of(stage, spec.view_of, layer)
    wanted = spec.view_of or name
    if spec.role == "in" or spec.view_of:
        others = [s for s in STAGES if s.number != stage.number and
                  (s.number < stage.number or spec.view_of == name)]
        for other in reversed(others):
            if any(t.name == wanted and t.role != "in" for t in other.tensors):
                return _memory_of(other, wanted, layer if other.scope == "layer" else None)
    return stage.number, name, layer


def estimate_bytes(config: ModelConfig, prompt_len: int, max_new_tokens: int, capture: Capture,
                   dtype: torch.dtype = torch.float32) -> int:
    """An estimate of the values a run keeps if it generates all max_new_tokens (an upper bound
    when it stops earlier). Each piece of memory counts once, however many records show it;
    weights (their corners), stages 1-3 and statistics are left out: they are small."""
    store = capture.store_dtype or dtype
    converted = store != dtype
    itemsize = {"int": 8, "complex": 8, "float32": 4 if store == torch.float32 else store.itemsize,
                "float": store.itemsize}
    S = prompt_len + max_new_tokens
    sizes = {"D": config.dim, "H": config.n_heads, "Hkv": config.n_kv_heads, "Dh": config.head_dim,
             "F": config.ffn_dim, "V": config.vocab_size, "S": S, "T0": prompt_len}
    blocks = {  # memory shared by every step: each layer's caches, and the one table of rotations
        "the cache (S, Hkv, Dh)": (S * config.n_kv_heads * config.head_dim * itemsize["float"], True),
        "the table of every position": (config.max_seq_len * config.head_dim // 2 * 8, False)}
    counted: set[tuple] = set()
    total = 0
    for step in range(max_new_tokens):
        P, T = (0, prompt_len) if step == 0 else (prompt_len + step - 1, 1)
        sizes.update(P=P, T=T)
        for stage in STAGES[3:]:
            layers = range(config.n_layers) if stage.scope == "layer" else [None]
            for spec in stage.tensors:
                if spec.role == "weight" or (spec.name == "mask" and T == 1):
                    continue
                for layer in (layer for layer in layers if capture.keeps(stage.number, step, layer)):
                    origin = _memory_of(stage, spec.name, layer)
                    origin_spec = STAGES[origin[0] - 1].spec(origin[1])
                    if origin_spec.view_of in blocks:
                        size, per_layer = blocks[origin_spec.view_of]
                        key = (origin_spec.view_of, origin[1], origin[2] if per_layer else None,
                               step if per_layer and converted else None)  # converted anew each step
                    else:
                        kind = ("int" if origin[1] in INTEGER else "complex" if origin[1] in COMPLEX
                                else "float32" if origin[1] in FLOAT32 else "float")
                        key, size = (origin, step), _numel(origin_spec.shape, sizes) * itemsize[kind]
                    if key not in counted:
                        counted.add(key)
                        total += size
    return total
