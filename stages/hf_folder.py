"""Reading a Hugging Face model folder: config.json, the weights in model.safetensors (or shards
listed by model.safetensors.index.json, memory-mapped), tokenizer.json with tokenizer_config.json
and the chat template wherever the folder keeps it.

Hugging Face's converter permuted the rows of wq and wk so that each head's pairs are
(i, i + Dh/2), for its "rotate_half" RoPE. Our stages rotate interleaved pairs (2i, 2i+1), as
Meta's code and GGUF do, so the rows are permuted back as they are read (`interleave_rows`):
with that, the stages give transformers' numbers; without it, only similar ones.
"""
from pathlib import Path

import torch

from .checkpoint import Checkpoint, Progress, read_json
from .config import ModelConfig
from .errors import UserError
from .rope import llama3_freq_factors
from .tokenizer import Tokenizer
from .weights import LayerWeights, Weights

# Our names (stages.weights) for the tensors of one block, under model.layers.N.
LAYER_TENSORS = {"attention_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
                  "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}
MAX_TOKENIZER_BYTES = 1 << 28


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk (n_heads·Dh, D) with each head's rows in rotate-half order (x[i], x[i+Dh/2]) ->
    the same rows in interleaved-pair order (x[2i], x[2i+1]): the inverse of transformers' `permute`."""
    rows, dim = w.shape
    return (w.reshape(n_heads, 2, rows // n_heads // 2, dim)  # (heads, half, Dh/2, D)
            .transpose(1, 2)  # (heads, Dh/2, half, D): pair i's two rows side by side
            .reshape(rows, dim))


def _rope_parameters(raw: dict) -> dict:
    """transformers 5 writes rope_parameters (rope_theta inside); older folders rope_scaling and a
    top-level rope_theta. Either way: one dict with rope_type and rope_theta."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def config_from_hf(raw: dict, where: Path) -> tuple[ModelConfig, dict]:
    """(config, rope parameters) from a config.json, refusing what our stages cannot run."""
    kind = raw.get("model_type")
    if kind != "llama":
        architectures = ", ".join(map(str, raw.get("architectures") or [])) or "none named"
        raise UserError(f"{where} is not a LLaMA-architecture model (model_type {kind!r}, {architectures}): "
                        f"only model_type 'llama' can be traced")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise UserError(f"unsupported: {where} has {key} (LLaMA has no biases)")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported activation {raw['hidden_act']!r} in {where} (LLaMA uses silu)")
    rope = _rope_parameters(raw)
    if rope["rope_type"] not in ("default", "llama3"):
        raise UserError(f"unsupported RoPE type {rope['rope_type']!r} in {where} (supported: default, llama3)")
    try:
        heads = raw["num_attention_heads"]
        config = ModelConfig(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], n_heads=heads,
                             n_kv_heads=raw.get("num_key_value_heads") or heads, vocab_size=raw["vocab_size"],
                             ffn_dim=raw["intermediate_size"], norm_eps=raw.get("rms_norm_eps", 1e-6),
                             rope_theta=rope["rope_theta"], max_seq_len=raw.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise UserError(f"{where} lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where} describes an impossible or unsupported model: {e}") from None
    if raw.get("head_dim") not in (None, config.head_dim):
        raise UserError(f"unsupported: {where} has head_dim {raw['head_dim']}, not hidden_size / heads")
    return config, rope


def _freq_factors(config: ModelConfig, rope: dict, where: Path) -> torch.Tensor | None:
    if rope["rope_type"] != "llama3":
        return None
    try:
        return llama3_freq_factors(config.head_dim, config.rope_theta, float(rope["factor"]),
                                   float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                                   int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        raise UserError(f"{where}: the llama3 RoPE scaling lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to files")
        names = sorted(set(weight_map.values()))
        if any(Path(n).name != n for n in names):
            raise UserError(f"{index} names a file outside its folder")
        return [folder / n for n in names]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
        raise UserError(f"{folder} holds PyTorch .bin weights only: convert them to safetensors (they can "
                        f"run code when loaded)")
    raise UserError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


def _open_tensors(files: list[Path]) -> dict:
    """tensor name -> an open safetensors file holding it (memory-mapped: nothing read yet)."""
    from safetensors import safe_open
    from .inputs import regular_file
    where = {}
    for path in files:
        regular_file(path, "weights file")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # the library raises several kinds on a damaged header
            raise UserError(f"cannot read {path} as safetensors: {e}") from None
        where |= {name: handle for name in handle.keys()}
    return where


def load_weights(folder: Path, config: ModelConfig, tied: bool, dtype: torch.dtype,
                 progress: Progress = None) -> Weights:
    tensors = _open_tensors(_weight_files(folder))
    total = 2 + 9 * config.n_layers + (not tied)
    done = 0

    def take(name: str, *shape: int) -> torch.Tensor:
        nonlocal done
        if name not in tensors:
            raise UserError(f"{folder} lacks tensor {name}")
        try:
            value = tensors[name].get_tensor(name)
        except Exception as e:
            raise UserError(f"tensor {name} is damaged ({type(e).__name__}: {e})") from None
        if tuple(value.shape) != shape:
            raise UserError(f"tensor {name} has shape {tuple(value.shape)}, but config.json says {shape}")
        if not value.is_floating_point():
            raise UserError(f"tensor {name} holds {value.dtype} values, not floating-point weights")
        done += 1
        if progress:
            progress(done, total)
        return value.to(dtype)

    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attention_norm": (c.dim,), "wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim),
              "wo": (c.dim, q), "ffn_norm": (c.dim,), "w1": (c.ffn_dim, c.dim), "w3": (c.ffn_dim, c.dim),
              "w2": (c.dim, c.ffn_dim)}
    layers = []
    for i in range(c.n_layers):
        w = {ours: take(f"model.layers.{i}.{theirs}.weight", *shapes[ours]) for ours, theirs in LAYER_TENSORS.items()}
        w["wq"], w["wk"] = interleave_rows(w["wq"], c.n_heads), interleave_rows(w["wk"], c.n_kv_heads)
        layers.append(LayerWeights(**w))
    tok_embeddings = take("model.embed_tokens.weight", c.vocab_size, c.dim)
    output = tok_embeddings if tied else take("lm_head.weight", c.vocab_size, c.dim)
    return Weights(tok_embeddings=tok_embeddings, layers=layers, norm=take("model.norm.weight", c.dim),
                   output=output)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, settings: dict) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8", errors="replace")
    if template is not None and not isinstance(template, str):
        raise UserError(f"the chat template in {folder} is not text")
    return template


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """tokenizer.json as the `tokenizers` library reads it, with the special tokens, the BOS rule,
    the tokens that end a turn (generation_config.json's too) and the chat template."""
    from tokenizers import Tokenizer as HFTokenizer
    from .inputs import regular_file
    path = regular_file(folder / "tokenizer.json", "tokenizer file")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise UserError(f"{path} is too large to be a tokenizer ({path.stat().st_size} bytes)")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not 0 < backend.get_vocab_size(with_added_tokens=True) <= vocab_size:
        raise UserError(f"{path} has {backend.get_vocab_size(with_added_tokens=True)} tokens, but the model "
                        f"has {vocab_size} embeddings")
    settings_path = folder / "tokenizer_config.json"
    settings = read_json(settings_path, "tokenizer settings") if settings_path.exists() else {}
    generation_path = folder / "generation_config.json"
    generation = read_json(generation_path, "generation settings") if generation_path.exists() else {}

    def token_id(key: str) -> int | None:
        text = _token_text(settings.get(key))
        return backend.token_to_id(text) if text is not None else None

    bos_id = token_id("bos_token")
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
        bos_id = generation["bos_token_id"]
    add_bos = settings.get("add_bos_token")
    if not isinstance(add_bos, bool):  # Llama 3's tokenizer.json adds it in its post-processor instead
        add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
    stop = {token_id("eos_token")}
    eos = generation.get("eos_token_id")
    stop.update(eos if isinstance(eos, list) else [eos])
    stop_ids = frozenset(i for i in stop if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size)
    pad_id = token_id("pad_token")
    return Tokenizer(backend=backend, bos_id=bos_id, add_bos=add_bos, stop_ids=stop_ids,
                     pad_id=pad_id if pad_id is not None else 0, chat_template=_chat_template(folder, settings))


def read_hf(path: Path, dtype: torch.dtype = torch.float32, progress: Progress = None,
            shapes_only: bool = False) -> Checkpoint:
    """A Hugging Face model folder (or its config.json alone, for the shapes); weights in `dtype`
    on the CPU (none with `shapes_only`)."""
    folder = path if path.is_dir() else path.parent
    config_path = path if path.is_file() else path / "config.json"
    raw = read_json(config_path, "model config")
    config, rope = config_from_hf(raw, config_path)
    tied = bool(raw.get("tie_word_embeddings", False))
    has_tokenizer = (folder / "tokenizer.json").exists()
    if not has_tokenizer and not shapes_only:
        raise UserError(f"{folder} has no tokenizer.json")
    tokenizer = read_tokenizer(folder, config.vocab_size) if has_tokenizer else None
    weights = None
    if not shapes_only:
        weights = load_weights(folder, config, tied, dtype, progress)
        weights.rope_freqs = _freq_factors(config, rope, config_path)
    files = len(_weight_files(folder)) if not shapes_only else 0
    source = (f"Hugging Face safetensors ({files} file{'s' if files != 1 else ''}) · wq/wk rows came in the "
              f"rotate-half layout, permuted into interleaved pairs at load") if files else "Hugging Face config.json"
    if rope["rope_type"] == "llama3":
        source += f" · RoPE frequencies scaled as Llama 3.1 does (factor {rope.get('factor')})"
    return Checkpoint(folder.name, config, weights, tokenizer, source, tied)
