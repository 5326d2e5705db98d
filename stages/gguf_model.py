"""Reading a LLaMA-architecture GGUF file: config from its metadata, weights
dequantized (by the `gguf` package, any type it knows) and cast to the run's
dtype one tensor at a time, tokenizer and chat template from its metadata.

GGUF keeps Meta's interleaved-pair RoPE layout for wq and wk (llama.cpp's
converter permutes Hugging Face weights back into it), so the rows are used
as they are. Llama 3.1's RoPE scaling comes as the tensor rope_freqs.
"""
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .checkpoint import Checkpoint, Progress
from .config import ModelConfig
from .errors import UserError
from .inputs import regular_file
from .tokenizer import Tokenizer
from .weights import LayerWeights, Weights

if TYPE_CHECKING:  # (the package is imported where a GGUF file is read: a run from the parsed copy never needs it)
    import gguf

# How the gguf package says that a tensor's type id is not one it knows (a type newer than the
# package, or one llama.cpp has dropped, such as 31-33, the Q4_0_4_4 family).
_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")

# Our names (stages.weights) for llama.cpp's tensor names.
LAYER_TENSORS = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                  "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def open_gguf(path: Path) -> "gguf.GGUFReader":
    regular_file(path, "model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"not a GGUF file (it does not start with 'GGUF'): {path}")
    import gguf  # (a tenth of a second, with the yaml it imports)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the library raises many kinds on a damaged file
        unknown = _UNKNOWN_TYPE.search(str(e))
        if unknown:
            raise UserError(f"cannot read GGUF file {path}: it holds a tensor of type {unknown[1]}, which the "
                            f"gguf package does not know (newer than it, or dropped by llama.cpp)") from None
        raise UserError(f"cannot read GGUF file {path}: {e}") from None


def read_fields(reader: "gguf.GGUFReader") -> dict:
    """Every metadata key with its value as plain Python (lists for arrays)."""
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # the library raises many kinds on damaged metadata
        raise UserError(f"the GGUF file's metadata is damaged ({type(e).__name__}: {e})") from None


def _vocab_size(fields: dict):
    """llama.vocab_size, or else the length of the token list (SmolLM2's files have only that)."""
    if "llama.vocab_size" in fields:
        return fields["llama.vocab_size"]
    if not isinstance(fields.get("tokenizer.ggml.tokens"), list):
        raise UserError("GGUF metadata lacks both llama.vocab_size and the tokenizer's tokenizer.ggml.tokens")
    return len(fields["tokenizer.ggml.tokens"])


def config_from_fields(fields: dict) -> ModelConfig:
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError("the GGUF file names no architecture (general.architecture)")
    if arch != "llama":
        raise UserError(f"unsupported architecture {arch!r}: only LLaMA-architecture GGUF files can be traced")
    if fields.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"unsupported RoPE scaling {fields['llama.rope.scaling.type']!r}")
    try:
        config = ModelConfig(
            dim=fields["llama.embedding_length"], n_layers=fields["llama.block_count"],
            n_heads=fields["llama.attention.head_count"],
            n_kv_heads=fields.get("llama.attention.head_count_kv", fields["llama.attention.head_count"]),
            vocab_size=_vocab_size(fields),
            ffn_dim=fields["llama.feed_forward_length"],
            norm_eps=fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=fields.get("llama.rope.freq_base", 10000.0),
            max_seq_len=fields.get("llama.context_length", 2048))
    except KeyError as e:
        raise UserError(f"GGUF metadata lacks {e.args[0]}") from None
    except ValueError as e:
        raise UserError(f"the model's metadata is impossible or unsupported: {e}") from None
    if fields.get("llama.rope.dimension_count", config.head_dim) != config.head_dim:
        raise UserError("unsupported: RoPE applied to only part of each head")
    return config


def _dequantize(tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor's values in `dtype`, if it has the shape the config says (checked before any work)."""
    if tuple(reversed([int(n) for n in tensor.shape])) != shape:  # GGUF lists dimensions innermost first
        raise UserError(f"tensor {tensor.name} has shape {tuple(reversed(tensor.shape.tolist()))}, but the "
                        f"model's metadata says {shape}")
    import gguf  # (imported already, by open_gguf)
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"unsupported tensor type {tensor.tensor_type.name} in tensor {tensor.name}: the gguf "
                        f"package cannot turn it into floating-point numbers") from None
    except Exception as e:  # a block size that does not divide, data cut short
        raise UserError(f"tensor {tensor.name} is damaged ({type(e).__name__}: {e})") from None
    if values.size != int(np.prod(shape)):
        raise UserError(f"tensor {tensor.name} holds {values.size} values, not the {int(np.prod(shape))} of {shape}")
    values = values.reshape(shape)
    if dtype == torch.float32:
        # F32 tensors come back as read-only views of the memory-mapped file: copy those only.
        return torch.from_numpy(np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def load_weights(reader: "gguf.GGUFReader", config: ModelConfig, dtype: torch.dtype = torch.float32,
                 progress: Progress = None) -> Weights:
    tensors = {t.name: t for t in reader.tensors}
    unsupported = sorted(n for n in tensors if n.endswith(".bias"))
    if unsupported:
        raise UserError(f"unsupported tensor {unsupported[0]} (LLaMA has no biases)")
    done, total = 0, len(tensors)

    def take(name: str, *shape: int, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        nonlocal done
        if name not in tensors:
            raise UserError(f"GGUF file lacks tensor {name}")
        value = _dequantize(tensors[name], shape, as_dtype)
        done += 1
        if progress:
            progress(done, total)
        return value

    c = config
    shapes = {"attention_norm": (c.dim,), "wq": (c.n_heads * c.head_dim, c.dim),
              "wk": (c.n_kv_heads * c.head_dim, c.dim), "wv": (c.n_kv_heads * c.head_dim, c.dim),
              "wo": (c.dim, c.n_heads * c.head_dim), "ffn_norm": (c.dim,), "w1": (c.ffn_dim, c.dim),
              "w3": (c.ffn_dim, c.dim), "w2": (c.dim, c.ffn_dim)}
    tok_embeddings = take("token_embd.weight", c.vocab_size, c.dim)  # (V, D)
    layers = [LayerWeights(**{ours: take(f"blk.{i}.{theirs}.weight", *shapes[ours])
                              for ours, theirs in LAYER_TENSORS.items()})
              for i in range(c.n_layers)]
    # Models with tied embeddings (SmolLM2) have no output.weight: the head reuses the table.
    output = take("output.weight", c.vocab_size, c.dim) if "output.weight" in tensors else tok_embeddings
    rope_freqs = (take("rope_freqs.weight", c.head_dim // 2, as_dtype=torch.float32)
                  if "rope_freqs.weight" in tensors else None)
    if rope_freqs is not None and not (torch.isfinite(rope_freqs).all() and (rope_freqs > 0).all()):
        raise UserError("the GGUF file's rope_freqs are not all positive numbers")
    return Weights(tok_embeddings=tok_embeddings, layers=layers, norm=take("output_norm.weight", c.dim),
                   output=output, rope_freqs=rope_freqs)


def source_and_tied(reader: "gguf.GGUFReader") -> tuple[str, bool]:
    """Where the weights come from, as stage 10 says it, and whether the output head is the embedding
    table (SmolLM2's files have no output.weight)."""
    types = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2})
    return (f"GGUF ({', '.join(types)}) · wq/wk rows in interleaved pairs, as the file stores them",
            "output.weight" not in {t.name for t in reader.tensors})


def read_gguf(path: Path, dtype: torch.dtype = torch.float32, progress: Progress = None,
              shapes_only: bool = False) -> Checkpoint:
    """A GGUF file's model; weights in `dtype` on the CPU (none with `shapes_only`)."""
    reader = open_gguf(path)
    return checkpoint_from_fields(path, read_fields(reader),
                                  lambda config: None if shapes_only else load_weights(reader, config, dtype, progress),
                                  *source_and_tied(reader))


def checkpoint_from_fields(path: Path, fields: dict, weights_of: Callable[[ModelConfig], Weights | None],
                           source: str, tied: bool) -> Checkpoint:
    """The checkpoint a GGUF file's metadata describes, with the weights `weights_of` gives for its
    config (asked for once the config and the tokenizer are known to be sound)."""
    config = config_from_fields(fields)
    tokenizer = Tokenizer.from_gguf_fields(fields, config.vocab_size)
    name = fields.get("general.name")
    return Checkpoint(name if isinstance(name, str) and name.strip() else path.stem, config, weights_of(config),
                      tokenizer, source, tied)
