"""--model pointing at Meta's original download: params.json, consolidated.NN.pth, tokenizer.model,
written here from a tiny random transformers LlamaForCausalLM (its weights under Meta's names, wq/wk
rows turned back into Meta's interleaved pairs, split into shards the way Meta's model-parallel
layers split them), then each stage compared with transformers."""
import base64
import dataclasses
import json
import struct
from unittest.mock import patch

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stages
from stages import UserError
from stages.chat_formats import LLAMA2, LLAMA3
from stages.checkpoint import read_checkpoint
from stages.config import TINY
from stages.presets import LLAMA_2_7B, LLAMA_3_1_8B
from stages.rope import base_frequencies, llama3_freq_factors
from trace.verify import hf_greedy, hf_stage_tensors

from .runs import assert_stages_match, record_run

# A tiny Llama 3 tokenizer: tiktoken ranks for the 256 bytes and a few merges; Meta's 256 special
# tokens follow them, so the model needs at least 256 + 5 + 256 rows of embeddings.
MERGES = [b"th", b"he", b" t", b" th", b" the"]
V = 528
# Meta's params.json for the tiny model: F = 160 by Meta's rule (2/3 of 4·64 = 170, times 0.9, up to 32s).
PARAMS = {"dim": TINY.dim, "n_layers": TINY.n_layers, "n_heads": TINY.n_heads, "n_kv_heads": TINY.n_kv_heads,
          "vocab_size": V, "multiple_of": 32, "ffn_dim_multiplier": 0.9, "norm_eps": 1e-5, "rope_theta": 500000.0}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
# Meta's published params.json files.
LLAMA_3_1_8B_PARAMS = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                       "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
                       "use_scaled_rope": True}
LLAMA_2_7B_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                     "vocab_size": -1}
PROMPT = [5, 17, 42, 99, 200, 7, 3, 150, 260, 300, 511]
# How Meta's model-parallel layers slice a weight among the shards (fairscale's ColumnParallelLinear
# by output rows, RowParallelLinear by input columns); norms are whole in every shard.
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output.")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def hf_model(rope_scaling=None, seed=0, n_kv_heads=TINY.n_kv_heads, ffn_dim=TINY.ffn_dim,
             rope_theta=PARAMS["rope_theta"]) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=V, hidden_size=TINY.dim, intermediate_size=ffn_dim,
                         num_hidden_layers=TINY.n_layers, num_attention_heads=TINY.n_heads,
                         num_key_value_heads=n_kv_heads, rms_norm_eps=PARAMS["norm_eps"],
                         rope_theta=rope_theta, rope_scaling=rope_scaling,
                         max_position_embeddings=131072 if rope_scaling else 4096, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # attention probabilities as tensors, like ours
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: give them random values so that they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows from transformers' rotate-half layout back to Meta's interleaved pairs: the inverse of
    `permute` in transformers' convert_llama_weights_to_hf.py (Meta -> HF), written out here."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_llama_weights_to_hf.py's own `permute` (Meta -> HF)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_state_dict(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(hf.config.num_hidden_layers):
        for meta, theirs in names.items():
            out[f"layers.{i}.{meta}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
        for meta, heads in (("attention.wq", TINY.n_heads), ("attention.wk", hf.config.num_key_value_heads)):
            w = out[f"layers.{i}.{meta}.weight"]
            out[f"layers.{i}.{meta}.weight"] = to_meta_rows(w, heads)
            assert torch.equal(hf_permute(out[f"layers.{i}.{meta}.weight"], heads), w)
    out["rope.freqs"] = base_frequencies(TINY.head_dim, 1e4)  # Llama 1's files hold their RoPE table; it is dropped
    return out


def split(sd: dict, n: int, embedding_axis: int) -> list[dict]:
    """Meta's n model-parallel shards of a whole state dict."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        if name == "tok_embeddings.weight":
            axis = embedding_axis  # Llama 3: by vocabulary rows (VocabParallelEmbedding); Llama 2: by columns
        elif any(part in name for part in COLUMN_PARALLEL):
            axis = 0
        elif any(part in name for part in ROW_PARALLEL):
            axis = 1
        else:
            axis = None
        pieces = t.chunk(n, axis) if axis is not None else [t] * n
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone(memory_format=torch.contiguous_format)  # its own storage, not the whole's
    return shards


def write_tiktoken(path):
    """Llama 3's kind of tokenizer.model: base64 of each token's bytes, and its rank."""
    ranks = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):  # wire type 0, a varint
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2, length-delimited


def write_sentencepiece(path):
    """Llama 2's kind of tokenizer.model, a SentencePiece ModelProto written field by field: pieces
    (text 1, float score 2, type 3: 2 unknown, 3 control, 6 byte, 1 normal), trainer_spec.model_type 2
    (BPE), normalizer_spec.remove_extra_whitespaces false, as Llama's has."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(p, -float(i), 1) for i, p in enumerate(["▁t", "he", "▁the", "▁", "t", "h", "e", "a"])]
    body = b"".join(_field(1, _field(1, p.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", score) + _field(3, kind))
                    for p, score, kind in pieces)
    path.write_bytes(body + _field(2, _field(3, 2)) + _field(3, _field(4, 0)))


def write_meta(folder, hf, *, shards=1, embedding_axis=0, dtype=torch.float32, tokenizer=write_tiktoken, **params):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({k: v for k, v in (PARAMS | params).items() if v is not None}))
    sd = {k: v.to(dtype) for k, v in meta_state_dict(hf).items()}
    for i, shard in enumerate(split(sd, shards, embedding_axis)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    tokenizer(folder / "tokenizer.model")
    return folder


def tensors(weights) -> dict[str, torch.Tensor]:
    found = {f"layers.{i}.{f.name}": getattr(layer, f.name) for i, layer in enumerate(weights.layers)
             for f in dataclasses.fields(layer)}
    return found | {name: getattr(weights, name) for name in ("tok_embeddings", "norm", "output")}


@pytest.fixture(scope="module")
def plain():
    return hf_model()


@pytest.fixture(scope="module")
def scaled():
    return hf_model(LLAMA31_SCALING, seed=1)


@pytest.fixture(scope="module")
def plain_folder(plain, tmp_path_factory):
    return write_meta(tmp_path_factory.mktemp("meta") / "Llama-tiny", plain)


@pytest.fixture(scope="module")
def scaled_sharded_folder(scaled, tmp_path_factory):
    return write_meta(tmp_path_factory.mktemp("meta") / "Llama-tiny-3.1", scaled, shards=2, use_scaled_rope=True)


def test_every_stage_matches_transformers(plain, plain_folder):
    model = stages.load_model(plain_folder, device="cpu")
    assert model.name == "Llama-tiny" and model.config == dataclasses.replace(
        TINY, vocab_size=V, rope_theta=500000.0, max_seq_len=4096)  # no max_seq_len, not Llama 3's vocabulary
    assert model.source == ("Meta consolidated.00.pth (1 shard, float32) · wq/wk rows in interleaved pairs, "
                            "as Meta stores them")
    assert model.weights.rope_freqs is None and model.tokenizer.chat_template == LLAMA3
    ids = stages.tokenize(model.tokenizer, "the theme of the thesis", chat=True)
    begin = 256 + len(MERGES)  # <|begin_of_text|>, the first of Meta's special tokens after the ranks
    assert ids[:2] == [begin, begin + 6] and model.tokenizer.decode(ids).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe theme")
    _, ours = record_run(model, ids, 1)
    theirs = hf_stage_tensors(plain, ids)
    assert len(theirs) == 3 + TINY.n_layers * 25
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)
    new_ids, _ = record_run(model, ids, 10)
    assert new_ids == hf_greedy(plain, ids, 10, model.tokenizer.stop_ids)[:len(new_ids)]


def test_llama31_scaled_rope_matches_transformers_llama3_scaling(scaled, scaled_sharded_folder):
    """Meta's fixed recipe (factor 8, low 1, high 4, original context 8192): at a tiny model's few
    positions it changes little, but the slowest pairs turn 8 times slower, and the numbers show it."""
    model = stages.load_model(scaled_sharded_folder, device="cpu")
    assert model.config.max_seq_len == 131072 and "(2 shards, float32)" in model.source
    assert "scaled as Llama 3.1 does (factor 8)" in model.source
    want = llama3_freq_factors(TINY.head_dim, 500000.0, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(model.weights.rope_freqs, want, rtol=0, atol=0)
    assert model.weights.rope_freqs.max() == 8 and model.weights.rope_freqs.min() == 1
    torch.testing.assert_close(base_frequencies(TINY.head_dim, 500000.0) / model.weights.rope_freqs,
                               scaled.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    _, ours = record_run(model, PROMPT, 1)
    assert_stages_match(ours, hf_stage_tensors(scaled, PROMPT), rtol=1e-4, atol=1e-5)
    new_ids, _ = record_run(model, PROMPT, 10)
    assert new_ids == hf_greedy(scaled, PROMPT, 10, model.tokenizer.stop_ids)[:len(new_ids)]
    # Without the scaling the same weights give other numbers.
    model.weights.rope_freqs = None
    model._freqs_cis = None
    _, unscaled = record_run(model, PROMPT, 1)
    assert not torch.allclose(unscaled[(19, "logits", None, 0)], ours[(19, "logits", None, 0)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embedding_axis, params", [(0, {}), (1, {"vocab_size": -1})], ids=["llama3", "llama2"])
def test_sharded_equals_single(plain, plain_folder, tmp_path, embedding_axis, params):
    """Two shards, the embeddings sliced by rows (Llama 3) or by columns (Llama 2, whose params.json
    says vocab_size -1: V is counted from the embeddings), glued back into the single file's tensors."""
    sharded = write_meta(tmp_path / "sharded", plain, shards=2, embedding_axis=embedding_axis, **params)
    assert torch.load(sharded / "consolidated.01.pth")["tok_embeddings.weight"].shape == \
        ((V // 2, TINY.dim) if embedding_axis == 0 else (V, TINY.dim // 2))
    one, two = (read_checkpoint(f) for f in (plain_folder, sharded))
    assert two.config == one.config
    assert two.source == one.source.replace("1 shard,", "2 shards,")
    assert tensors(one.weights).keys() == tensors(two.weights).keys()
    for name, value in tensors(one.weights).items():
        assert torch.equal(value, tensors(two.weights)[name]), name


def test_llama2_folder(tmp_path):
    """Llama 2's download: vocab_size -1 (V from the embeddings, which 2 shards slice by columns), no
    n_kv_heads (Hkv = H), rope_theta (10000) or ffn_dim_multiplier, a SentencePiece tokenizer.model with
    the Llama 2 chat format, 4K context."""
    hf = hf_model(n_kv_heads=TINY.n_heads, ffn_dim=192, rope_theta=10000.0)
    params = {"vocab_size": -1, "multiple_of": 32, "n_kv_heads": None, "rope_theta": None, "ffn_dim_multiplier": None}
    folder = write_meta(tmp_path / "llama-2-tiny", hf, shards=2, embedding_axis=1, tokenizer=write_sentencepiece,
                        **params)
    assert set(json.loads((folder / "params.json").read_text())) == {"dim", "n_layers", "n_heads", "vocab_size",
                                                                     "multiple_of", "norm_eps"}
    model = stages.load_model(folder, device="cpu")
    assert model.config == dataclasses.replace(TINY, n_kv_heads=TINY.n_heads, vocab_size=V, ffn_dim=192,
                                               max_seq_len=4096)
    assert model.tokenizer.chat_template == LLAMA2 and model.tokenizer.vocab_size == 3 + 256 + 8
    ids = stages.tokenize(model.tokenizer, "the theme", chat=True)
    assert ids[0] == 1 and "[INST] the theme [/INST]" in model.tokenizer.decode(ids)  # <s> is id 1
    _, ours = record_run(model, ids, 1)
    assert_stages_match(ours, hf_stage_tensors(hf, ids), rtol=1e-4, atol=1e-5)
    # Shapes only: V counted in tokenizer.model (smaller than this tiny model's table), F by Meta's rule.
    shapes = read_checkpoint(folder / "params.json")
    assert shapes.config == dataclasses.replace(model.config, vocab_size=3 + 256 + 8)
    assert "V=267 from tokenizer.model" in shapes.source


def test_bfloat16_loading_and_bfloat16_files(plain, plain_folder, tmp_path):
    model = stages.load_model(plain_folder, device="cpu", dtype="bfloat16")
    assert model.weights.layers[0].wq.dtype == torch.bfloat16 and model.weights.output.dtype == torch.bfloat16
    record_run(model, PROMPT, 2)
    # Meta publishes bfloat16: read into float32, two shards give the rounded weights, exactly.
    folder = write_meta(tmp_path / "bf16", plain, shards=2, dtype=torch.bfloat16)
    checkpoint = read_checkpoint(folder, torch.float32)
    assert "(2 shards, bfloat16)" in checkpoint.source
    want = to_meta_rows(plain.model.layers[1].self_attn.k_proj.weight.detach(), TINY.n_kv_heads)
    assert checkpoint.weights.layers[1].wk.dtype == torch.float32
    assert torch.equal(checkpoint.weights.layers[1].wk, want.bfloat16().float())


def test_progress_counts_every_tensor(plain_folder):
    calls = []
    read_checkpoint(plain_folder, progress=lambda done, total: calls.append((done, total)))
    total = 3 + 9 * TINY.n_layers
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_shapes_only_reads_no_weights(tmp_path, plain_folder):
    (tmp_path / "params.json").write_text(json.dumps(LLAMA_3_1_8B_PARAMS))
    (tmp_path / "consolidated.00.pth").write_bytes(b"not read")
    with patch.object(torch, "load", side_effect=AssertionError("a .pth was read")):
        checkpoint = read_checkpoint(tmp_path, shapes_only=True)
        alone = read_checkpoint(tmp_path / "params.json")  # a params.json alone means shapes only
        tiny = read_checkpoint(plain_folder, shapes_only=True)
    assert checkpoint.weights is None and checkpoint.tokenizer is None and alone.weights is None
    assert checkpoint.config == alone.config == LLAMA_3_1_8B  # F = 14336 from Meta's rule; 128K context
    assert "factor 8" in checkpoint.source
    assert tiny.config == read_checkpoint(plain_folder).config  # Meta's rule gives the F of w1's rows
    model = stages.load_model(tmp_path / "params.json", shapes_only=True)
    assert model.weights.layers[31].w1.shape == (14336, 4096) and model.weights.output.device.type == "meta"


def test_context_without_max_seq_len_is_the_model_cards(tmp_path):
    """Llama 3 (its 128256-token vocabulary, no scaled RoPE): 8K; a max_seq_len in params.json wins."""
    (tmp_path / "params.json").write_text(json.dumps(LLAMA_3_1_8B_PARAMS | {"use_scaled_rope": False}))
    assert read_checkpoint(tmp_path / "params.json").config.max_seq_len == 8192
    (tmp_path / "params.json").write_text(json.dumps(LLAMA_3_1_8B_PARAMS | {"max_seq_len": 2048}))
    assert read_checkpoint(tmp_path / "params.json").config.max_seq_len == 2048


def test_shapes_only_llama2_7b(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(LLAMA_2_7B_PARAMS))
    checkpoint = read_checkpoint(tmp_path / "params.json")
    assert checkpoint.config == LLAMA_2_7B  # F = 11008, Hkv = H, V = 32000 assumed, 4K context
    assert "V=32000 assumed" in checkpoint.source


def _edit_params(folder, **changes):
    params = json.loads((folder / "params.json").read_text())
    params.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        params.pop(key, None)
    (folder / "params.json").write_text(json.dumps(params))


def _edit_shard(path, change):
    tensors = torch.load(path)
    change(tensors)
    torch.save(tensors, path)


class NotATensor:
    pass


def _shrink_wq(tensors):
    tensors["layers.0.attention.wq.weight"] = tensors["layers.0.attention.wq.weight"][:16]


def _integer_output(tensors):
    tensors["output.weight"] = tensors["output.weight"].long()


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda f: [p.unlink() for p in f.glob("*.pth")], "has no consolidated.00.pth", id="no-shards"),
    pytest.param(lambda f: (f / "consolidated.00.pth").unlink(),
                 "lacks consolidated.00.pth: it has shards up to consolidated.01", id="missing-shard"),
    pytest.param(lambda f: (f / "tokenizer.model").unlink(), "has no tokenizer.model", id="no-tokenizer"),
    pytest.param(lambda f: _edit_params(f, dim=None), "lacks dim", id="no-dim"),
    pytest.param(lambda f: _edit_params(f, vision_chunk_size=560),
                 "has 'vision_chunk_size', which no LLaMA params.json has", id="vision-model"),
    pytest.param(lambda f: _edit_params(f, n_heads=5), "not a multiple of n_heads 5", id="impossible-heads"),
    pytest.param(lambda f: _edit_params(f, n_kv_heads=4),
                 "tensor layers.0.attention.wk.weight has shape (32, 64), but params.json says (64, 64)",
                 id="wrong-shape"),
    pytest.param(lambda f: _edit_params(f, n_layers=3), "lacks tensor layers.2.attention_norm.weight",
                 id="missing-tensor"),
    pytest.param(lambda f: _edit_params(f, n_layers=1), "unexpected tensor layers.1.attention.wk.weight",
                 id="extra-tensor"),
    pytest.param(lambda f: (f / "params.json").write_text("{not json"), "is not valid JSON", id="bad-json"),
    pytest.param(lambda f: _edit_shard(f / "consolidated.01.pth", lambda t: t.pop("layers.1.ffn_norm.weight")),
                 "the shards disagree: consolidated.00.pth holds layers.1.ffn_norm.weight and consolidated.01.pth "
                 "does not", id="shard-lacks-tensor"),
    pytest.param(lambda f: _edit_shard(f / "consolidated.01.pth", _shrink_wq),
                 "the shards disagree: layers.0.attention.wq.weight has shape (32, 64) in consolidated.00.pth and "
                 "(16, 64) in consolidated.01.pth", id="shard-shape"),
    pytest.param(lambda f: _edit_shard(f / "consolidated.01.pth", lambda t: t["norm.weight"].mul_(2)),
                 "the shards disagree on the values of norm.weight", id="replicated-values"),
    pytest.param(lambda f: _edit_shard(f / "consolidated.00.pth", _integer_output),
                 "tensor output.weight holds torch.int64 values", id="integer-tensor"),
    pytest.param(lambda f: (f / "consolidated.01.pth").write_bytes(b"garbage"),
                 "cannot read consolidated.01.pth as Meta weights", id="not-a-pickle"),
    pytest.param(lambda f: torch.save({"norm.weight": NotATensor()}, f / "consolidated.01.pth"),
                 "cannot read consolidated.01.pth as Meta weights: Weights only load failed", id="unsafe-pickle"),
])
def test_a_bad_folder_gets_one_line_naming_what_is_wrong(plain, tmp_path, damage, message):
    folder = write_meta(tmp_path / "meta", plain, shards=2)
    damage(folder)
    with pytest.raises(UserError) as caught:
        stages.load_model(folder, device="cpu")
    assert message in str(caught.value) and "\n" not in str(caught.value)
