"""Reading Meta's original download: params.json, the weights in consolidated.NN.pth (one file per
model-parallel shard), tokenizer.model (tiktoken ranks for Llama 3, SentencePiece for Llama 2).

Meta's checkpoints are the layout our stages are written in: the same tensor names, and wq/wk rows
in interleaved pairs (2i, 2i+1), so nothing is permuted. What needs work is the sharding: Meta's
model-parallel layers each hold a slice of a weight, glued back together here one tensor at a time,
in the run's dtype, from memory-mapped files.
"""
import re
from pathlib import Path

import torch

from .checkpoint import Checkpoint, Progress, read_json
from .config import ModelConfig
from .errors import UserError
from .rope import llama3_freq_factors
from .tokenizer import Tokenizer
from .weights import LayerWeights, Weights

# Every key Meta's params.json files hold (Llama 1, 2, 3, 3.1, 3.2, 3.3 and Code Llama): any other one
# (vision_*, moe, quantization_args, lora_args...) belongs to a model these stages cannot run.
_KNOWN_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}

# Llama 3.1's RoPE scaling, as Meta's apply_scaling hard-codes it: params.json says only use_scaled_rope.
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 8192}

# Where params.json gives no max_seq_len (Meta's code leaves it to the caller, Llama.build), the context
# length each family's model card gives: Llama 2 4K, Llama 3 8K, Llama 3.1 and later (scaled RoPE) 128K.
LLAMA2_CONTEXT, LLAMA3_CONTEXT, LLAMA31_CONTEXT = 4096, 8192, 131072
LLAMA3_MIN_VOCAB = 128000  # Llama 3's tiktoken vocabulary (then 256 special tokens); Llama 2's holds 32000
LLAMA2_VOCAB = 32000  # V where params.json says -1 and no tokenizer.model is there to count (shapes only)

# Our names (stages.weights) for the tensors of one block, under layers.N, and how Meta's model-parallel
# layers slice each among the shards: column-parallel ones by output rows (dim 0), row-parallel ones by
# input columns (dim 1); norms are whole in every shard (None).
LAYER_TENSORS = {"attention_norm": ("attention_norm", None), "wq": ("attention.wq", 0), "wk": ("attention.wk", 0),
                  "wv": ("attention.wv", 0), "wo": ("attention.wo", 1), "ffn_norm": ("ffn_norm", None),
                  "w1": ("feed_forward.w1", 0), "w3": ("feed_forward.w3", 0), "w2": ("feed_forward.w2", 1)}
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """F as Meta's FeedForward computes it: 2/3 of 4·D (SwiGLU has three matrices where GPT had two),
    times ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _number(params: dict, key: str, where: Path, default, whole: bool = False):
    """params[key] (or `default` where it is absent or null), if it is a number of the right kind."""
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise UserError(f"{where}: {key} must be a {'whole ' if whole else ''}number, not {value!r}")
    return value


def read_params(where: Path) -> dict:
    """params.json, checked: the keys of a LLaMA model, each of the right kind, Meta's defaults
    (its ModelArgs) for the ones older files leave out; vocab_size None where the file says -1."""
    params = read_json(where, "model config")
    unknown = sorted(set(params) - _KNOWN_KEYS)
    if unknown:
        raise UserError(f"{where} has {unknown[0]!r}, which no LLaMA params.json has: not a model these "
                        f"stages can run")
    for key in ("dim", "n_layers", "n_heads"):
        if params.get(key) is None:
            raise UserError(f"{where} lacks {key}, so it is not a LLaMA params.json")
    raw = {key: _number(params, key, where, None, whole=True)
           for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")}
    if raw["n_kv_heads"] is None:
        raw["n_kv_heads"] = raw["n_heads"]
    vocab_size = _number(params, "vocab_size", where, -1, whole=True)
    raw["vocab_size"] = None if vocab_size == -1 else vocab_size
    raw["multiple_of"] = _number(params, "multiple_of", where, 256, whole=True)
    raw["ffn_dim_multiplier"] = _number(params, "ffn_dim_multiplier", where, None)
    raw["norm_eps"] = float(_number(params, "norm_eps", where, 1e-5))
    raw["rope_theta"] = float(_number(params, "rope_theta", where, 10000.0))
    raw["use_scaled_rope"] = params.get("use_scaled_rope", False)
    if not isinstance(raw["use_scaled_rope"], bool):
        raise UserError(f"{where}: use_scaled_rope must be true or false, not {raw['use_scaled_rope']!r}")
    if raw["multiple_of"] < 1 or (raw["ffn_dim_multiplier"] is not None and not raw["ffn_dim_multiplier"] > 0):
        raise UserError(f"{where}: impossible FFN sizing (multiple_of {raw['multiple_of']}, "
                        f"ffn_dim_multiplier {raw['ffn_dim_multiplier']})")
    return raw


def make_config(raw: dict, vocab_size: int, ffn_dim: int, where: Path) -> ModelConfig:
    if raw["max_seq_len"] is not None:
        context = raw["max_seq_len"]
    elif raw["use_scaled_rope"]:
        context = LLAMA31_CONTEXT
    else:
        context = LLAMA3_CONTEXT if vocab_size >= LLAMA3_MIN_VOCAB else LLAMA2_CONTEXT
    try:
        return ModelConfig(dim=raw["dim"], n_layers=raw["n_layers"], n_heads=raw["n_heads"],
                           n_kv_heads=raw["n_kv_heads"], vocab_size=vocab_size, ffn_dim=ffn_dim,
                           norm_eps=raw["norm_eps"], rope_theta=raw["rope_theta"], max_seq_len=context)
    except ValueError as e:
        raise UserError(f"{where} describes an impossible or unsupported model: {e}") from None


def freq_factors(config: ModelConfig) -> torch.Tensor:
    """(Dh/2) divisors of RoPE's frequencies, Llama 3.1's fixed recipe."""
    s = LLAMA31_SCALING
    return llama3_freq_factors(config.head_dim, config.rope_theta, s["factor"], s["low_freq_factor"],
                               s["high_freq_factor"], s["original_context"])


def shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth, .01, ... in order; every number from 00 up must be there."""
    found = {int(m[1]): p for p in folder.iterdir() if (m := _SHARD_NAME.fullmatch(p.name))}
    if not found:
        raise UserError(f"{folder} has no consolidated.00.pth (Meta's weights)")
    for n in range(max(found) + 1):
        if n not in found:
            raise UserError(f"{folder} lacks consolidated.{n:02d}.pth: it has shards up to "
                            f"consolidated.{max(found):02d}.pth")
    return [found[n] for n in range(len(found))]


def _open_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors, memory-mapped (nothing read yet). weights_only: a .pth is a pickle, and this
    refuses any pickle that would run code."""
    from .inputs import regular_file
    regular_file(path, "weights file")
    try:
        tensors = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # the unpickler raises many kinds; its messages run over several lines
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot read {path.name} as Meta weights: {first_line.strip()}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise UserError(f"{path.name} is not a dictionary of named tensors, so not Meta weights")
    return tensors


class Shards:
    """The tensors of every shard by name, glued into whole tensors on request."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.tensors = [_open_shard(f) for f in files]
        first = set(self.tensors[0])
        for path, tensors in zip(files[1:], self.tensors[1:]):
            if set(tensors) != first:
                name = sorted(first ^ set(tensors))[0]
                holder, other = (files[0], path) if name in first else (path, files[0])
                raise UserError(f"the shards disagree: {holder.name} holds {name} and {other.name} does not")

    @property
    def names(self) -> set[str]:
        return set(self.tensors[0])

    def pieces(self, name: str) -> list[torch.Tensor]:
        pieces = [t[name] for t in self.tensors]
        for path, piece in zip(self.files[1:], pieces[1:]):
            if piece.shape != pieces[0].shape:
                raise UserError(f"the shards disagree: {name} has shape {tuple(pieces[0].shape)} in "
                                f"{self.files[0].name} and {tuple(piece.shape)} in {path.name}")
        if not pieces[0].is_floating_point():
            raise UserError(f"tensor {name} holds {pieces[0].dtype} values, not floating-point weights")
        return pieces

    def merged_shape(self, name: str, axis: int | None) -> tuple[int, ...]:
        shape = list(self.pieces(name)[0].shape)
        if axis is not None:
            if axis >= len(shape):
                raise UserError(f"tensor {name} has shape {tuple(shape)}: too few dimensions for a weight matrix")
            shape[axis] *= len(self.files)
        return tuple(shape)

    def take(self, name: str, axis: int | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor, checked against `shape`, in `dtype` (copied once where it must be)."""
        if self.merged_shape(name, axis) != shape:
            raise UserError(f"tensor {name} has shape {self.merged_shape(name, axis)}, but params.json says {shape}")
        pieces = self.pieces(name)
        if axis is None:  # replicated: every shard holds the same values
            if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
                raise UserError(f"the shards disagree on the values of {name}, which each should hold whole")
            return pieces[0].to(dtype)
        if len(pieces) == 1:
            # No copy where the file has the run's dtype: it stays memory-mapped (unless it is tall and
            # float32: the model then stores it column by column, stages.weights.for_decoding).
            return pieces[0].to(dtype)
        whole = torch.empty(shape, dtype=dtype)
        for i, piece in enumerate(pieces):  # each slice cast as it is copied: no second copy of the whole
            whole.narrow(axis, i * piece.shape[axis], piece.shape[axis]).copy_(piece)
        return whole

    def embedding_axis(self, dim: int) -> int:
        """Llama 3 slices the embeddings by vocabulary rows (VocabParallelEmbedding), Llama 2 by
        columns (ParallelEmbedding): tell which from a shard's shape."""
        shape = tuple(self.pieces("tok_embeddings.weight")[0].shape)
        if len(shape) == 2 and shape[1] == dim:
            return 0
        if len(shape) == 2 and shape[1] * len(self.files) == dim:
            return 1
        raise UserError(f"tensor tok_embeddings.weight has shape {shape} in each of {len(self.files)} "
                        f"shard(s): neither rows nor columns of a (V, {dim}) table")

    def dtypes(self) -> str:
        return ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in self.tensors[0].values()
                                 if t.dim() == 2}))


def _expected_names(n_layers: int) -> list[str]:
    layers = [f"layers.{i}.{theirs}.weight" for i in range(n_layers) for theirs, _ in LAYER_TENSORS.values()]
    return ["tok_embeddings.weight", *layers, "norm.weight", "output.weight"]


def load_weights(shards: Shards, raw: dict, where: Path, dtype: torch.dtype,
                 progress: Progress = None) -> tuple[ModelConfig, Weights]:
    """The config (F from w1's rows, V from the embeddings where params.json says -1) and the weights."""
    expected = _expected_names(raw["n_layers"])
    for name in expected:
        if name not in shards.names:
            raise UserError(f"{shards.files[0].name} lacks tensor {name}")
    unexpected = sorted(shards.names - set(expected) - {"rope.freqs"})  # Llama 1 saved its RoPE table
    if unexpected:
        raise UserError(f"unexpected tensor {unexpected[0]} in {shards.files[0].name}: not part of a LLaMA "
                        f"model of {raw['n_layers']} layers")
    embedding_axis = shards.embedding_axis(raw["dim"])
    vocab_size = raw["vocab_size"] or shards.merged_shape("tok_embeddings.weight", embedding_axis)[0]
    ffn_dim = shards.merged_shape("layers.0.feed_forward.w1.weight", 0)[0]  # params.json has no F
    config = c = make_config(raw, vocab_size, ffn_dim, where)
    done, total = 0, len(expected)

    def take(name: str, axis: int | None, *shape: int) -> torch.Tensor:
        nonlocal done
        value = shards.take(name, axis, shape, dtype)
        done += 1
        if progress:
            progress(done, total)
        return value

    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attention_norm": (c.dim,), "wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim),
              "wo": (c.dim, q), "ffn_norm": (c.dim,), "w1": (c.ffn_dim, c.dim), "w3": (c.ffn_dim, c.dim),
              "w2": (c.dim, c.ffn_dim)}
    tok_embeddings = take("tok_embeddings.weight", embedding_axis, c.vocab_size, c.dim)  # (V, D)
    layers = [LayerWeights(**{ours: take(f"layers.{i}.{theirs}.weight", axis, *shapes[ours])
                              for ours, (theirs, axis) in LAYER_TENSORS.items()})
              for i in range(c.n_layers)]
    norm = take("norm.weight", None, c.dim)
    output = take("output.weight", 0, c.vocab_size, c.dim)  # (V, D), sliced by rows like every column-parallel layer
    return config, Weights(tok_embeddings=tok_embeddings, layers=layers, norm=norm, output=output,
                           rope_freqs=freq_factors(config) if raw["use_scaled_rope"] else None)


def read_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.model, Llama 3's tiktoken ranks or Llama 2's SentencePiece, with its chat format."""
    from .tiktoken_vocab import tokenizer_from_model_file
    return tokenizer_from_model_file(path)


def _check_vocab(tokenizer: Tokenizer | None, config: ModelConfig, path: Path):
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{path} has {tokenizer.vocab_size} tokens, but the model has {config.vocab_size} embeddings")


def read_meta(path: Path, dtype: torch.dtype = torch.float32, progress: Progress = None,
              shapes_only: bool = False) -> Checkpoint:
    """A Meta download folder (or its params.json alone, for the shapes); weights in `dtype` on the
    CPU (none with `shapes_only`)."""
    folder = path if path.is_dir() else path.parent
    params_path = path if path.is_file() else path / "params.json"
    raw = read_params(params_path)
    tokenizer_path = folder / "tokenizer.model"
    if not shapes_only:
        shards = Shards(shard_files(folder))  # before the tokenizer: no weights is the bigger problem
        if not tokenizer_path.exists():
            raise UserError(f"{folder} has no tokenizer.model")
        config, weights = load_weights(shards, raw, params_path, dtype, progress)
        tokenizer = read_tokenizer(tokenizer_path)
        source = (f"Meta consolidated.00.pth ({len(shards.files)} shard{'s' if len(shards.files) != 1 else ''}, "
                  f"{shards.dtypes()}) · wq/wk rows in interleaved pairs, as Meta stores them")
    else:
        weights = None
        tokenizer = read_tokenizer(tokenizer_path) if tokenizer_path.exists() else None
        vocab_size = raw["vocab_size"] or (tokenizer.vocab_size if tokenizer else LLAMA2_VOCAB)
        config = make_config(raw, vocab_size, meta_ffn_dim(raw["dim"], raw["multiple_of"], raw["ffn_dim_multiplier"]),
                             params_path)
        source = "Meta params.json (F from its multiple_of and ffn_dim_multiplier, as Meta's FeedForward computes it)"
        if raw["vocab_size"] is None:
            source += (f" · V={vocab_size} from tokenizer.model" if tokenizer else
                       f" · V={vocab_size} assumed, Llama 2's vocabulary (params.json says -1, no tokenizer.model)")
    _check_vocab(tokenizer, config, tokenizer_path)
    if raw["use_scaled_rope"]:
        source += f" · RoPE frequencies scaled as Llama 3.1 does (factor {LLAMA31_SCALING['factor']:g})"
    return Checkpoint(folder.name, config, weights, tokenizer, source, tied=False)
