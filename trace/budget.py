"""How many bytes a capture policy will keep, said before the run, from the stage
registry's symbolic shapes: views of another tensor's memory (registry `view_of`)
cost nothing, and each layer's KV cache is one block of (S, Hkv, Dh)."""
import math

import torch

from stages import ModelConfig
from stages.kv_cache import kv_cache_bytes
from stages.registry import STAGES, Stage
from stages.tensor_ids import BLOCK_OUTPUT, EMBEDDINGS

from .recorder import Capture

INTEGER = {"token ids", "tokens", "tokens[P:P+T]", "next token"}
COMPLEX = {"xq (complex)", "xk (complex)", "freqs_cis"}
FLOAT32 = {"logits", "probs", "mask", "cos", "sin", "xq (rotate_half)", "xk (rotate_half)"}


def _numel(symbolic: str, sizes: dict[str, int]) -> int:
    dims = [d.strip() for d in symbolic.strip("()").split(",") if d.strip()]
    # The registry's shapes use the letters of stages.config, '·' for products and '/' for halves.
    return math.prod(eval(d.replace("·", "*").replace("/", "//"), {"__builtins__": {}}, sizes) for d in dims)


def _memory_of(stages: tuple[Stage, ...], stage: Stage, name: str, layer: int | None) -> tuple[int, str, int | None]:
    """(stage, tensor, layer) that first made the memory a record shows: views lead to what they
    view, inputs to the latest earlier stage that made a tensor of that name."""
    spec = stage.spec(name)
    if spec.view_of == "out":  # the block's input: the output of the block before, or the embeddings
        return (*BLOCK_OUTPUT, layer - 1) if layer else (*EMBEDDINGS, None)
    if spec.view_of and spec.view_of != name and spec.view_of in {t.name for t in stage.tensors}:
        return _memory_of(stages, stage, spec.view_of, layer)
    wanted = spec.view_of or name
    if spec.role == "in" or spec.view_of:
        others = [s for s in stages if s.number != stage.number and
                  (s.number < stage.number or spec.view_of == name)]
        for other in reversed(others):
            if any(t.name == wanted and t.role != "in" for t in other.tensors):
                return _memory_of(stages, other, wanted, layer if other.scope == "layer" else None)
    return stage.number, name, layer


def _step_groups(capture: Capture, n_steps: int) -> list[tuple[int, int]]:
    """Inclusive ranges of steps over which every rule's step filter gives the same answer:
    the prompt step alone, then the decode steps cut wherever a range of steps starts or ends."""
    cuts = {0, 1, n_steps}
    for rule in capture.rules:
        for lo, hi in rule.steps.spans if rule.steps is not None else ():
            cuts.update(c for c in (lo, hi + 1) if 0 < c < n_steps)
    edges = sorted(cuts)
    return [(a, b - 1) for a, b in zip(edges, edges[1:]) if a < b]


def estimate_bytes(config: ModelConfig, prompt_len: int, max_new_tokens: int, capture: Capture,
                   dtype: torch.dtype = torch.float32, stages: tuple[Stage, ...] = STAGES) -> int:
    """An estimate of the values a run keeps if it generates all max_new_tokens (an upper bound
    when it stops earlier). Each piece of memory counts once, however many records show it;
    weights (their corners), stages 1-3 and statistics are left out: they are small.

    Steps whose capture decisions are the same are counted together: a decode step's sizes
    grow linearly with the cached positions P, so a group of them sums in closed form and
    the estimate costs the same for 10 new tokens as for 100,000."""
    store = capture.store_dtype or dtype
    converted = store != dtype
    itemsize = {"int": 8, "complex": 8, "float32": 4 if store == torch.float32 else store.itemsize,
                "float": store.itemsize}
    S = prompt_len + max_new_tokens
    sizes = {"D": config.dim, "H": config.n_heads, "Hkv": config.n_kv_heads, "Dh": config.head_dim,
             "F": config.ffn_dim, "V": config.vocab_size, "S": S, "T0": prompt_len}
    cache = "the cache (S, Hkv, Dh)"  # the registry's name of the memory each layer's cache shares with every step
    cache_bytes = S * config.n_kv_heads * config.head_dim * itemsize["float"]
    records = []  # (stage, tensor, layer, where its memory comes from), every record one step makes
    for stage in stages[3:]:
        for spec in (spec for spec in stage.tensors if spec.role != "weight"):
            for layer in range(config.n_layers) if stage.scope == "layer" else [None]:
                origin = _memory_of(stages, stage, spec.name, layer)
                # Values stored smaller are converted once per layer (recorder.Recorder._smaller): a
                # block's input is converted again in the next layer, and a complex view is kept as it
                # is beside its converted pairs.
                if converted and (origin[2] != layer or spec.name in COMPLEX):
                    origin = (stage.number, spec.name, layer)
                records.append((stage.number, spec.name, layer, origin))

    def step_bytes(origins: set, P: int, T: int) -> int:
        sizes.update(P=P, T=T)
        total = 0
        for origin in origins:
            kind = ("int" if origin[1] in INTEGER else "complex" if origin[1] in COMPLEX
                    else "float32" if origin[1] in FLOAT32 else "float")
            total += _numel(stages[origin[0] - 1].spec(origin[1]).shape, sizes) * itemsize[kind]
        return total

    total, counted_blocks = 0, set()
    for first, last in _step_groups(capture, max_new_tokens):
        origins = set()  # the memory this group's steps keep, each piece once per step
        converted_blocks = set()  # caches converted anew each step of the group, each once per step
        for stage, name, layer, origin in records:
            if (name == "mask" and first > 0) or not capture.keeps(stage, first, layer):
                continue
            if stages[origin[0] - 1].spec(origin[1]).view_of != cache:
                origins.add(origin)
                continue
            key = (origin[1], origin[2])  # cache_k or cache_v, of a layer
            if converted and key not in converted_blocks:  # converted anew each step
                converted_blocks.add(key)
                total += cache_bytes * (last - first + 1)
            elif not converted and key not in counted_blocks:
                counted_blocks.add(key)
                total += cache_bytes
        if first == 0:
            total += step_bytes(origins, 0, prompt_len)
            continue
        n, P = last - first + 1, prompt_len + first - 1
        at_first, at_next = step_bytes(origins, P, 1), step_bytes(origins, P + 1, 1)
        total += n * at_first + (at_next - at_first) * n * (n - 1) // 2  # sizes grow linearly with P
    return total


def parameter_count(config: ModelConfig, tied: bool) -> int:
    c = config
    per_layer = 2 * c.dim + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.dim + c.dim * c.n_heads * c.head_dim \
        + 3 * c.dim * c.ffn_dim  # the two norms, wq wk wv, wo, w1 w3 w2
    return c.n_layers * per_layer + c.vocab_size * c.dim * (1 if tied else 2) + c.dim  # (the head counted once when tied)


def memory_needs(config: ModelConfig, prompt_len: int, max_new_tokens: int, dtype: torch.dtype,
                 tied: bool) -> dict[str, int]:
    """Bytes a real run of this model would take, said without running it: the weights (the head
    counted once when tied), the KV caches of every position, and a trace that keeps everything."""
    parameters = parameter_count(config, tied)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return {"parameters": parameters, "weights": parameters * itemsize,
            "kv_cache": kv_cache_bytes(config.n_layers, config.n_kv_heads, config.head_dim, prompt_len + max_new_tokens, dtype),
            "full_trace": estimate_bytes(config, prompt_len, max_new_tokens, Capture.everything(), dtype)}


def training_bytes(config: ModelConfig, batch: int, seq: int, tied: bool) -> int:
    """About the memory one training step of B×T tokens takes in float32, said before it runs (an
    upper bound within ~20%): every weight five times (itself, its gradient, AdamW's two moments,
    the copy that shows its update), each layer's activations that backward keeps, and the
    logits with their log-probabilities and both their gradients (B, T, V) each."""
    c, tokens = config, batch * seq
    parameters = parameter_count(config, tied)
    per_token_layer = 12 * c.dim + 8 * c.n_heads * c.head_dim + 4 * c.ffn_dim + 3 * c.n_heads * seq
    return 4 * (5 * parameters + tokens * c.n_layers * per_token_layer + 4 * tokens * c.vocab_size)


def free_bytes(device: torch.device) -> int | None:
    """Memory the run can still take on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
