"""GGUF files of every common tensor type (F32 to Q2_K), and Llama 3.1's rope_freqs, against
transformers' LlamaForCausalLM built from the same dequantized weights: the loader returns exactly
what `gguf` dequantizes, and every stage and the greedy continuation match."""
import dataclasses

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import stages
from stages import UserError
from stages.config import TINY, ModelConfig
from stages.gguf_model import LAYER_TENSORS as GGUF_NAMES
from stages.hf_folder import LAYER_TENSORS as HF_NAMES, interleave_rows
from stages.rope import base_frequencies, llama3_freq_factors
from trace.verify import hf_greedy, hf_stage_tensors, write_gguf

from .gguf_writer import Q, encode, llamacpp_rope_freqs, rewrite_gguf, set_type_id
from .runs import assert_stages_match, record_run

# Rows of 256 values, as the K-quants' blocks need: D = 256, F = 512 (H = 4, Hkv = 2, Dh = 64).
CONFIG = dataclasses.replace(TINY, dim=256, ffn_dim=512)
# Each type, and the significant bits it keeps of a weight (for the encoder's own check).
TYPES = {Q.F32: 24, Q.F16: 11, Q.BF16: 8, Q.Q8_0: 8, Q.Q6_K: 6, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5,
         Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q3_K: 3, Q.Q2_K: 2}
PROMPT = [0, 5, 17, 42, 99, 200, 7, 3, 150, 260]
# Llama 3.1's scaling, with an original context far shorter than the prompts so that it matters.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LLAMA3_ARGS = (LLAMA3["factor"], LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"])  # then the original context


def hf_llama(config: ModelConfig, rope: dict | None = None) -> LlamaForCausalLM:
    """transformers' model of `config` (eager attention, float32), random weights."""
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, rms_norm_eps=config.norm_eps,
                            max_position_embeddings=config.max_seq_len, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta} | (rope or {}))
    hf_config._attn_implementation = "eager"  # attention probabilities as tensors, like ours
    return LlamaForCausalLM(hf_config).eval()


def random_llama(seed: int, rope: dict | None = None) -> LlamaForCausalLM:
    """transformers' model of CONFIG with random weights, norms too (so that they matter)."""
    torch.manual_seed(seed)
    hf = hf_llama(CONFIG, rope)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk rows in interleaved-pair order -> rotate-half order: the inverse of `interleave_rows`."""
    rows, dim = w.shape
    return (w.reshape(n_heads, rows // n_heads // 2, 2, dim)  # (heads, Dh/2, pair, D)
            .transpose(1, 2)  # (heads, pair, Dh/2, D): the first of each pair, then the second
            .reshape(rows, dim))


def dequantized(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as `gguf` itself dequantizes it, float32 in (rows, cols) order."""
    return {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            .reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors}


def hf_from_values(values: dict[str, np.ndarray], config: ModelConfig, rope: dict | None = None):
    """transformers' model holding a GGUF file's dequantized weights, wq/wk rows in its own layout."""
    hf = hf_llama(config, rope)
    state = {"model.embed_tokens.weight": values["token_embd.weight"], "lm_head.weight": values["output.weight"],
             "model.norm.weight": values["output_norm.weight"]}
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    for i in range(config.n_layers):
        for ours, theirs in GGUF_NAMES.items():
            w = torch.from_numpy(values[f"blk.{i}.{theirs}.weight"])
            w = rotate_half_rows(w, heads[ours]) if ours in heads else w
            state[f"model.layers.{i}.{HF_NAMES[ours]}.weight"] = w
    hf.load_state_dict({name: torch.as_tensor(w) for name, w in state.items()}, strict=True)
    return hf


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A float32 GGUF file of a tiny random LLaMA."""
    return write_gguf(random_llama(3), tmp_path_factory.mktemp("gguf") / "f32.gguf")


@pytest.fixture(scope="module", params=list(TYPES), ids=lambda t: t.name)
def typed(request, source):
    """(type, file, our model, its dequantized tensors, transformers' model on them)."""
    qtype = request.param
    path = rewrite_gguf(source, source.with_name(f"{qtype.name}.gguf"), qtype)
    values = dequantized(path)
    return qtype, path, stages.load_model(path, device="cpu"), values, hf_from_values(values, CONFIG)


def test_rotate_half_rows_undoes_interleave_rows():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(rotate_half_rows(interleave_rows(w, 4), 4), w)
    assert not torch.equal(interleave_rows(w, 4), w)


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_encoded_weights_read_back_close_to_the_originals(qtype):
    """The writer's own check: what `gguf` reads back from our bytes is the matrix, give or take
    the type's precision (a wrongly packed block would be off by the size of the weights)."""
    x = np.random.default_rng(0).standard_normal((32, 512)).astype(np.float32)
    back = gguf.quants.dequantize(encode(x, qtype), qtype).reshape(x.shape)
    rms_error = np.sqrt(np.mean((back - x) ** 2))
    assert rms_error <= 2.0 ** (1 - TYPES[qtype]) * np.sqrt(np.mean(x ** 2))


def test_the_file_stores_every_matrix_in_its_type_and_the_norms_in_f32(typed):
    qtype, path, model, _, _ = typed
    for t in gguf.GGUFReader(path).tensors:
        assert t.tensor_type == (qtype if len(t.shape) == 2 else Q.F32), t.name
    assert model.source.startswith(f"GGUF ({qtype.name}) ")


def test_loaded_weights_equal_what_gguf_dequantizes(typed):
    _, _, model, values, _ = typed
    w = model.weights
    pairs = [(w.tok_embeddings, "token_embd.weight"), (w.output, "output.weight"), (w.norm, "output_norm.weight")]
    pairs += [(getattr(layer, ours), f"blk.{i}.{theirs}.weight")
              for i, layer in enumerate(w.layers) for ours, theirs in GGUF_NAMES.items()]
    assert len(pairs) == len(values)  # every tensor of the file
    for ours, name in pairs:
        assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(values[name])), name
    assert w.rope_freqs is None


def test_every_stage_and_the_greedy_continuation_match_transformers(typed):
    _, _, model, _, hf = typed
    new_ids, ours = record_run(model, PROMPT, 8)
    theirs = hf_stage_tensors(hf, PROMPT)
    assert len(theirs) == 3 + CONFIG.n_layers * 25  # all of them were compared
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)
    assert len(new_ids) == 8 and new_ids == hf_greedy(hf, PROMPT, 8, stop_ids={1})[:len(new_ids)]


# Llama 3.1's RoPE scaling: the divisors as the rope_freqs tensor.

@pytest.mark.parametrize("head_dim, theta, original", [(64, 10000.0, 32), (128, 500000.0, 8192)],
                         ids=["tiny", "llama-3.1-8b"])
def test_llama3_freq_factors_give_transformers_llama3_frequencies(head_dim, theta, original):
    scaling = LLAMA3 | {"original_max_position_embeddings": original}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=4 * original,
                         rope_parameters=scaling | {"rope_theta": theta})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # (Dh/2) frequencies
    factors = llama3_freq_factors(head_dim, theta, *LLAMA3_ARGS, original)
    torch.testing.assert_close(base_frequencies(head_dim, theta) / factors, theirs, rtol=1e-6, atol=0)
    llamacpp = torch.from_numpy(llamacpp_rope_freqs(head_dim, theta, *LLAMA3_ARGS, original))
    torch.testing.assert_close(factors, llamacpp, rtol=1e-6, atol=0)
    assert factors.min() == 1 and factors.max() == 8 and ((factors > 1) & (factors < 8)).any()  # all three kinds


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """(file with rope_freqs, file without, transformers' model with llama3 scaling) on the same weights."""
    folder = tmp_path_factory.mktemp("rope")
    base = write_gguf(random_llama(4, LLAMA3), folder / "source.gguf")
    freqs = llamacpp_rope_freqs(CONFIG.head_dim, CONFIG.rope_theta, *LLAMA3_ARGS,
                                LLAMA3["original_max_position_embeddings"])
    path = rewrite_gguf(base, folder / "scaled.gguf", Q.Q8_0, {"rope_freqs.weight": freqs})
    unscaled = rewrite_gguf(base, folder / "unscaled.gguf", Q.Q8_0)
    return path, unscaled, hf_from_values(dequantized(path), CONFIG, LLAMA3)


def test_rope_freqs_are_read_as_the_file_stores_them(scaled):
    path, _, _ = scaled
    model = stages.load_model(path, device="cpu")
    stored = dequantized(path)["rope_freqs.weight"]
    assert stored.shape == (CONFIG.head_dim // 2,) and stored.min() == 1 and stored.max() == 8
    assert torch.equal(model.weights.rope_freqs, torch.from_numpy(stored))


def test_rope_freqs_come_back_from_the_parsed_copy(scaled):
    path, _, _ = scaled
    from stages.parsed_cache import read_parsed_once
    first, again = (read_parsed_once(path, "made-up identity") for _ in range(2))  # parses, then reads the copy
    assert (path.with_name(path.name + ".parsed") / "weights.safetensors").is_file()
    stored = torch.from_numpy(dequantized(path)["rope_freqs.weight"])
    assert torch.equal(first.weights.rope_freqs, stored) and torch.equal(again.weights.rope_freqs, stored)


def test_every_stage_matches_transformers_with_rope_freqs(scaled):
    path, unscaled, hf = scaled
    ids = torch.randint(2, CONFIG.vocab_size, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    assert len(ids) > LLAMA3["original_max_position_embeddings"]
    theirs = hf_stage_tensors(hf, ids)
    assert len(theirs) == 3 + CONFIG.n_layers * 25  # stage 10's rotated xq and xk among them
    new_ids, ours = record_run(stages.load_model(path, device="cpu"), ids, 8)
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)
    assert new_ids == hf_greedy(hf, ids, 8, stop_ids={1})[:len(new_ids)]
    # Without the tensor the same weights rotate otherwise: the comparison above could tell.
    _, plain = record_run(stages.load_model(unscaled, device="cpu"), ids, 1)
    torch.testing.assert_close(plain[(8, "xq", 0, 0)], ours[(8, "xq", 0, 0)])
    assert not torch.allclose(plain[(10, "xq (rotated)", 0, 0)], ours[(10, "xq (rotated)", 0, 0)],
                              rtol=1e-3, atol=1e-3)


# Files that cannot be run: one line saying why.

def _unknown_type(path):  # type 31 was Q4_0_4_4, which llama.cpp dropped; the reader no longer knows it
    set_type_id(path, "blk.0.attn_q.weight", 31)


def _integer_type(path):  # I32 has F32's size: a valid file whose weights are integers
    set_type_id(path, "blk.0.attn_q.weight", Q.I32.value)


BAD = {
    "unknown type": ({}, _unknown_type, "a tensor of type 31, which the gguf package does not know"),
    "unsupported type": ({}, _integer_type, "unsupported tensor type I32 in tensor blk.0.attn_q.weight"),
    "wrong shape": ({"blk.1.attn_k.weight": np.zeros((CONFIG.dim, CONFIG.dim), np.float32)}, None,
                    "tensor blk.1.attn_k.weight has shape (256, 256), but the model's metadata says (128, 256)"),
    "missing tensor": ({"blk.1.ffn_up.weight": None}, None, "lacks tensor blk.1.ffn_up.weight"),
    "rope_freqs too long": ({"rope_freqs.weight": np.ones(CONFIG.head_dim, np.float32)}, None,
                            "rope_freqs.weight has shape (64,), but the model's metadata says (32,)"),
    "rope_freqs zeros": ({"rope_freqs.weight": np.zeros(CONFIG.head_dim // 2, np.float32)}, None,
                         "rope_freqs are not all positive"),
    "rope_freqs nan": ({"rope_freqs.weight": np.full(CONFIG.head_dim // 2, np.nan, np.float32)}, None,
                       "rope_freqs are not all positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_file_gives_one_line_of_error(case, source):
    tensors, damage, expected = BAD[case]
    path = rewrite_gguf(source, source.with_name(f"bad-{case.replace(' ', '-')}.gguf"), Q.F32, tensors)
    if damage:
        damage(path)
    with pytest.raises(UserError) as error:
        stages.load_model(path, device="cpu")
    message = str(error.value)
    assert expected in message and "\n" not in message
