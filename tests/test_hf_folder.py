"""--model pointing at a Hugging Face model folder, written here with save_pretrained: each stage
against transformers' LlamaForCausalLM loaded from the same folder."""
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import stages
from stages import UserError
from stages.config import TINY
from stages.hf_folder import interleave_rows
from trace.verify import _tiny_vocab, hf_greedy, hf_stage_tensors

from .runs import assert_stages_match, record_run

CHAT = ("{{ bos_token }}{% for m in messages %}<|reserved_0|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
        "{% if add_generation_prompt %}<|reserved_0|>assistant\n{% endif %}")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # shorter than the prompts: the scaling matters


def _tokenizer() -> PreTrainedTokenizerFast:
    tokens, _, merges = _tiny_vocab(TINY.vocab_size)
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[tuple(m.split(" ")) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                        chat_template=CHAT)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_0|>"]})
    return tokenizer


def write_folder(folder, *, n_kv_heads=2, tied=False, rope_scaling=None, shard=None):
    """A real Hugging Face folder of a tiny random LLaMA (random norms too, so that they matter)."""
    c = TINY
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=n_kv_heads,
                         rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=tied,
                         rope_scaling=rope_scaling, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    _tokenizer().save_pretrained(folder)
    return folder


def _reference(folder):
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def scaled_sharded(tmp_path_factory):
    """GQA, an untied head, Llama 3.1's RoPE scaling, weights in several shards, chat_template.jinja."""
    return write_folder(tmp_path_factory.mktemp("hf"), rope_scaling=LLAMA3_SCALING, shard="100KB")


def test_the_folder_has_what_a_download_has(scaled_sharded):
    names = {p.name for p in scaled_sharded.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1


def test_chat_prompt_with_a_system_prompt_gives_transformers_ids(scaled_sharded):
    model = stages.load_model(scaled_sharded, device="cpu")
    ours = stages.tokenize(model.tokenizer, "the cat sat", chat=True, system="be brief")
    theirs = AutoTokenizer.from_pretrained(scaled_sharded).apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(theirs)


@pytest.mark.parametrize("text", ["the theme", "  two  spaces\n\nand lines\t", "naïve café ☕ 東京 123456",
                                  "<|reserved_0|>the<|eos|>"])
def test_tokenizer_matches_transformers_on_tricky_text(scaled_sharded, text):
    model = stages.load_model(scaled_sharded, device="cpu")
    theirs = AutoTokenizer.from_pretrained(scaled_sharded)
    assert model.tokenizer.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False)
    assert model.tokenizer.decode(theirs.encode(text, add_special_tokens=False)) == text


def test_every_stage_matches_transformers_with_llama3_rope_scaling(scaled_sharded):
    model = stages.load_model(scaled_sharded, device="cpu")
    assert "rotate-half" in model.source and "interleaved" in model.source
    assert model.weights.rope_freqs is not None and model.weights.output is not model.weights.tok_embeddings
    hf = _reference(scaled_sharded)
    ids = stages.tokenize(model.tokenizer, "the theme of the thesis", chat=True)
    assert len(ids) > LLAMA3_SCALING["original_max_position_embeddings"]
    _, ours = record_run(model, ids, 1)
    theirs = hf_stage_tensors(hf, ids)
    assert len(theirs) == 3 + TINY.n_layers * 25
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)
    new_ids, _ = record_run(model, ids, 10)
    assert new_ids == hf_greedy(hf, ids, 10, model.tokenizer.stop_ids)[:len(new_ids)]


def test_without_the_row_permutation_the_numbers_would_differ(scaled_sharded):
    """The un-permuting matters: rotate-half rows rotated as interleaved pairs give other scores."""
    model = stages.load_model(scaled_sharded, device="cpu")
    ids = list(range(2, 30))
    _, right = record_run(model, ids, 1)
    for layer in model.weights.layers:  # one more shuffle: no longer the layout the model was trained in
        layer.wq = interleave_rows(layer.wq, model.config.n_heads)
        layer.wk = interleave_rows(layer.wk, model.config.n_kv_heads)
    _, wrong = record_run(model, ids, 1)
    assert not torch.allclose(right[(13, "scores", 0, 0)], wrong[(13, "scores", 0, 0)], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(right[(8, "xv", 0, 0)], wrong[(8, "xv", 0, 0)])


def test_tied_single_file_folder_with_older_config_keys(tmp_path):
    """A folder as transformers 4 wrote it: rope_scaling and a top-level rope_theta, the chat template
    inside tokenizer_config.json, one model.safetensors, the head tied to the embeddings."""
    folder = write_folder(tmp_path, n_kv_heads=4, tied=True, rope_scaling=LLAMA3_SCALING)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = (folder / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "chat_template.jinja").unlink()
    model = stages.load_model(folder, device="cpu")
    assert model.weights.output is model.weights.tok_embeddings and model.tokenizer.chat_template == CHAT
    ids = stages.tokenize(model.tokenizer, "the theme of the thesis", chat=True)
    _, ours = record_run(model, ids, 1)
    assert_stages_match(ours, hf_stage_tensors(_reference(folder), ids), rtol=1e-4, atol=1e-5)


def test_bfloat16_weights_are_read_as_bfloat16(scaled_sharded):
    model = stages.load_model(scaled_sharded, device="cpu", dtype="bfloat16")
    assert model.weights.layers[0].wq.dtype == torch.bfloat16
    assert model.weights.rope_freqs.dtype == torch.float32
    new_ids, ours = record_run(model, list(range(2, 12)), 2)
    assert ours[(13, "scores (softmax)", 0, 0)].dtype == torch.bfloat16
    assert ours[(19, "logits", None, 0)].dtype == torch.float32


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda f: next(f.glob("model-00002-*.safetensors")).unlink(), "weights file not found"),
    (lambda f: _edit_config(f, intermediate_size=96), "but config.json says (96, 64)"),
    (lambda f: _edit_config(f, model_type="mistral", architectures=["MistralForCausalLM"]),
     "is not a LLaMA-architecture model (model_type 'mistral', MistralForCausalLM)"),
    (lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "unsupported RoPE type 'yarn'"),
    (lambda f: _edit_config(f, num_attention_heads=5), "not a multiple of n_heads 5"),
    (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
])
def test_a_bad_folder_gets_one_line_naming_what_is_wrong(tmp_path, damage, message):
    folder = write_folder(tmp_path, shard="100KB")
    damage(folder)
    with pytest.raises(UserError) as caught:
        stages.load_model(folder, device="cpu")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_without_a_model_is_named_so(tmp_path):
    with pytest.raises(UserError, match="without config.json .* or params.json"):
        stages.load_model(tmp_path, device="cpu")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot tell what"):
        stages.load_model(tmp_path / "notes.txt", device="cpu")
