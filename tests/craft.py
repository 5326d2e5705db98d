"""Small real files made the way an attacker or a damaged disk would make them."""
import json
import struct
from pathlib import Path

import gguf
import numpy as np

from stages.config import TINY
from trace.verify import _tiny_vocab


def tiny_gguf(path: Path, fields: dict | None = None, tensors: dict | None = None, arch: str = "llama") -> Path:
    """A real tiny LLaMA GGUF (random float32 weights, a byte-level BPE vocabulary). `fields` replaces
    metadata: key -> (GGUF type name, value), or None to leave the key out; `tensors` replaces weights."""
    c, rng = TINY, np.random.default_rng(0)
    tokens, types, merges = _tiny_vocab(c.vocab_size)
    meta = {"general.name": ("string", "tiny-crafted"), "llama.block_count": ("uint32", c.n_layers),
            "llama.context_length": ("uint32", c.max_seq_len), "llama.embedding_length": ("uint32", c.dim),
            "llama.feed_forward_length": ("uint32", c.ffn_dim), "llama.attention.head_count": ("uint32", c.n_heads),
            "llama.attention.head_count_kv": ("uint32", c.n_kv_heads),
            "llama.attention.layer_norm_rms_epsilon": ("float32", c.norm_eps),
            "tokenizer.ggml.model": ("string", "gpt2"), "tokenizer.ggml.pre": ("string", "gpt2"),
            "tokenizer.ggml.tokens": ("array", tokens), "tokenizer.ggml.token_type": ("array", types),
            "tokenizer.ggml.merges": ("array", merges), "tokenizer.ggml.bos_token_id": ("uint32", 0),
            "tokenizer.ggml.eos_token_id": ("uint32", 1)}
    meta.update(fields or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, typed in meta.items():
        if typed is not None:
            kind, value = typed
            getattr(writer, f"add_{kind}")(key, value)
    D, F, Dh = c.dim, c.ffn_dim, c.dim // c.n_heads
    weights = {"token_embd.weight": (c.vocab_size, D), "output_norm.weight": (D,), "output.weight": (c.vocab_size, D)}
    for i in range(c.n_layers):
        weights |= {f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (D, D),
                    f"blk.{i}.attn_k.weight": (c.n_kv_heads * Dh, D), f"blk.{i}.attn_v.weight": (c.n_kv_heads * Dh, D),
                    f"blk.{i}.attn_output.weight": (D, D), f"blk.{i}.ffn_norm.weight": (D,),
                    f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                    f"blk.{i}.ffn_down.weight": (D, F)}
    for name, shape in weights.items():
        value = (tensors or {}).get(name, rng.normal(0, 0.05, shape).astype(np.float32))
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_manifest(path: Path) -> tuple[dict, dict, bytes]:
    """(safetensors header, trace manifest, the stored data) of a trace file."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    return header, json.loads(header["__metadata__"]["llama-trace"]), data[8 + size:]


def write_manifest(path: Path, header: dict, manifest, data: bytes) -> Path:
    """A trace file with this manifest (any JSON value) in an otherwise valid safetensors header."""
    header["__metadata__"]["llama-trace"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path
