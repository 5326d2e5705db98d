"""The independent reference: Hugging Face transformers' LlamaForCausalLM, and
how to line its tensors up with ours.

Hugging Face keeps wq/wk rows in the "rotate_half" layout (pairs i, i+Dh/2);
GGUF and our stages use interleaved pairs (2i, 2i+1). `to_interleaved` maps
a per-head vector from the first layout to the second, so that every tensor
can be compared element for element.
"""
import dataclasses
from pathlib import Path
from unittest.mock import patch

import gguf
import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.models.llama import modeling_llama
from transformers.utils import logging as hf_logging

import stages
from stages.config import TINY
from stages.hf_folder import interleave_rows
from stages.tensor_ids import (ATTENTION_MODULE_OUTPUT, ATTENTION_NORMED, ATTENTION_OUTPUT, ATTENTION_WEIGHTS, BLOCK_OUTPUT, CACHE_K,
                              CACHE_V, EMBEDDINGS, FFN_NORMED, FFN_OUTPUT, FINAL_NORMED, GATE, GATED, HEADS_MERGED, HEAD_OUTPUTS,
                              KEYS_TRANSPOSED, LOGITS, STREAM_AFTER_ATTENTION, UP, VALUES_TRANSPOSED, XK, XK_ROTATED, XQ, XQ_ROTATED, XV)


def to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., n·Dh) or (..., Dh) in rotate-half layout -> the same in interleaved-pair layout."""
    shape = t.shape
    t = t.reshape(*shape[:-1], -1, 2, head_dim // 2)  # (..., n, 2, Dh/2)
    return t.transpose(-1, -2).reshape(shape)  # (..., n, Dh/2, 2) -> (..., n·Dh)


def _tiny_vocab(size: int):
    specials = ["<|bos|>", "<|eos|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tokens = specials + alphabet + ["".join(m) for m in merges]
    tokens += [f"<|reserved_{i}|>" for i in range(size - len(tokens))]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tokens, types, [" ".join(m) for m in merges]


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """A real GGUF file (float32 tensors, byte-level BPE vocabulary) holding the HF model's weights."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    tokens, types, merges = _tiny_vocab(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            w = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                w = interleave_rows(torch.from_numpy(w), c.num_attention_heads).numpy()
            if ours == "attn_k":
                w = interleave_rows(torch.from_numpy(w), c.num_key_value_heads).numpy()
            writer.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_pair(path: Path, n_heads: int, n_kv_heads: int, **sizes: int):
    """(our Model, HF LlamaForCausalLM) of TINY with these heads (and other `sizes`: dim, ffn_dim, ...),
    the same random weights, through a real GGUF file at `path`."""
    config = dataclasses.replace(TINY, n_heads=n_heads, n_kv_heads=n_kv_heads, **sizes)
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim,
                            intermediate_size=config.ffn_dim, num_hidden_layers=config.n_layers,
                            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
                            max_position_embeddings=config.max_seq_len, tie_word_embeddings=False)
    hf_config._attn_implementation = "eager"  # attention probabilities as tensors, like ours
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms start at 1: give them random values so that they matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = stages.load_model(write_gguf(hf, path), device="cpu")
    # GGUF stores eps as float32: compare it with that precision.
    assert dataclasses.replace(model.config, norm_eps=config.norm_eps) == config
    assert abs(model.config.norm_eps - config.norm_eps) < 1e-9
    return model, hf


def load_hf_gguf(path: Path):
    """transformers' own model (eager attention, float32) and tokenizer, from the same GGUF file."""
    hf_logging.disable_progress_bar()
    # Its GGUF reader draws a tqdm bar of its own (a stale widget in a saved notebook): not here.
    with patch.object(gguf_utils, "tqdm", lambda items, **_: items):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def hf_stage_tensors(hf: LlamaForCausalLM, ids: list[int]) -> dict[tuple[int, str, int | None], torch.Tensor]:
    """HF's values for our (stage, tensor name, layer) at the prompt step, in our layout, batch removed."""
    c = hf.config
    head_dim = c.hidden_size // c.num_attention_heads
    found: dict = {}
    hooks = []

    def keep(module, key, layout=None, use_input=False):
        def hook(mod, args, output):
            value = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
            value = value.detach()[0]
            found[key] = to_interleaved(value, head_dim) if layout == "heads" else value
        hooks.append(module.register_forward_hook(hook))

    keep(hf.model.embed_tokens, (*EMBEDDINGS, None))
    for i, layer in enumerate(hf.model.layers):
        keep(layer.input_layernorm, (*ATTENTION_NORMED, i))
        keep(layer.self_attn.q_proj, (*XQ, i), layout="heads")
        keep(layer.self_attn.k_proj, (*XK, i), layout="heads")
        keep(layer.self_attn.v_proj, (*XV, i))
        keep(layer.self_attn, (*ATTENTION_MODULE_OUTPUT, i))
        keep(layer.self_attn.o_proj, (*HEADS_MERGED, i), use_input=True)
        keep(layer.self_attn.o_proj, (*ATTENTION_OUTPUT, i))
        keep(layer.post_attention_layernorm, (*STREAM_AFTER_ATTENTION, i), use_input=True)
        keep(layer.post_attention_layernorm, (*FFN_NORMED, i))
        keep(layer.mlp.act_fn, (*GATE, i))
        keep(layer.mlp.up_proj, (*UP, i))
        keep(layer.mlp.down_proj, (*GATED, i), use_input=True)
        keep(layer.mlp, (*FFN_OUTPUT, i))
        keep(layer, (*BLOCK_OUTPUT, i))
    keep(hf.model.norm, (*FINAL_NORMED, None))
    def attention(module, query, key, value, *args, **kwargs):
        """transformers' own attention, seen from inside: the rotated queries and keys, the keys
        and values repeated for every query head, and the heads' outputs."""
        i, T = module.layer_idx, query.shape[2]
        found[(*XQ_ROTATED, i)] = to_interleaved(query[0].transpose(0, 1), head_dim)  # (H, T, Dh) -> (T, H, Dh)
        found[(*XK_ROTATED, i)] = to_interleaved(key[0, :, -T:].transpose(0, 1), head_dim)  # (T, Hkv, Dh)
        found[(*KEYS_TRANSPOSED, i)] = to_interleaved(repeat_kv(key, module.num_key_value_groups)[0], head_dim)
        found[(*VALUES_TRANSPOSED, i)] = repeat_kv(value, module.num_key_value_groups)[0]  # (H, S, Dh)
        output, weights = eager_attention(module, query, key, value, *args, **kwargs)
        found[(*HEAD_OUTPUTS, i)] = output[0].transpose(0, 1)  # (T, H, Dh) -> (H, T, Dh)
        return output, weights

    eager_attention, repeat_kv = modeling_llama.eager_attention_forward, modeling_llama.repeat_kv
    try:
        with torch.no_grad(), patch.object(modeling_llama, "eager_attention_forward", attention):
            out = hf(torch.tensor([ids]), output_attentions=True, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    # newer transformers call the output's past_key_values `cache` (the old name still works, with a warning)
    caches = out["cache"] if "cache" in out else out["past_key_values"]
    for i in range(c.num_hidden_layers):
        found[(*ATTENTION_WEIGHTS, i)] = out.attentions[i][0]
        cache = caches.layers[i]
        found[(*CACHE_K, i)] = to_interleaved(cache.keys[0].transpose(0, 1), head_dim)  # (T, Hkv, Dh)
        found[(*CACHE_V, i)] = cache.values[0].transpose(0, 1)
        for name in ("xq", "xk", "xv"):  # stage 9 splits the last dimension into heads: the same numbers
            found[(9, f"{name} (reshaped)", i)] = found[(8, name, i)].reshape(len(ids), -1, head_dim)
    found[(*LOGITS, None)] = out.logits[0, -1]
    return found


def hf_greedy(hf: LlamaForCausalLM, ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0])
    return out[0, len(ids):].tolist()
