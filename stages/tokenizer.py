"""The model's own tokenizer, rebuilt from the GGUF metadata with the `tokenizers`
library, and its chat template, rendered with Jinja as Hugging Face does.

GGUF files hold one of two kinds of vocabulary: byte-level BPE with its merges ('gpt2': Llama 3,
SmolLM2) or SentencePiece's pieces with their scores ('llama': Llama 1 and 2), rebuilt in
stages.sentencepiece_vocab.
"""
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .chat_template import render_chat_template
from .errors import UserError
from .inputs import regular_file

# llama.cpp's token types: 3 = control (<|im_start|> ...), 4 = user-defined.
_SPECIAL_TYPES = (3, 4)

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# The largest tokenizer.model we read: Llama 3's is 2.2 MB, Llama 2's 0.5 MB.
MAX_MODEL_FILE_BYTES = 64 << 20


def read_model_file(path: Path) -> bytes:
    """The bytes of a tokenizer.model file, read only if it is a regular file of a tokenizer's size."""
    regular_file(path, "tokenizer file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty, so not a tokenizer")
    if size > MAX_MODEL_FILE_BYTES:
        raise UserError(f"{path} is too large to be a tokenizer ({size} bytes)")
    return path.read_bytes()


def llama3_pre_tokenizer():
    """Llama 3's split of text into words (tiktoken's regular expression), then each word's UTF-8
    bytes as byte-level characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pre_tokenizer(pre: str):
    """The pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Every digit on its own, then the GPT-2 split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    if pre in ("llama-bpe", "llama3"):
        return llama3_pre_tokenizer()
    raise UserError(f"unsupported tokenizer pre-type {pre!r} (supported: smollm, starcoder, gpt2, llama-bpe)")


_ID_FIELDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id")


def _strings(fields: dict, key: str) -> list[str]:
    value = fields.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"the GGUF file's tokenizer lacks {key}, or it is not a list of strings")
    return value


def _sentencepiece_from_fields(fields: dict, tokens: list[str], types: list[int], ids: dict,
                               template: str | None) -> "Tokenizer":
    """A SentencePiece vocabulary in GGUF: its pieces, their scores and llama.cpp's token types
    (the same numbers as SentencePiece's own), with llama.cpp's defaults where a field is absent."""
    from .sentencepiece_vocab import tokenizer_from_pieces
    scores = fields.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
        raise UserError(f"the GGUF tokenizer's tokenizer.ggml.scores are missing or damaged (SentencePiece "
                        f"needs one score for each of its {len(tokens)} tokens)")
    if len(types) != len(tokens):
        raise UserError(f"the GGUF tokenizer has {len(types)} token types for its {len(tokens)} tokens")
    flags = {key: fields.get(key, True) for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"the GGUF tokenizer's {key} is {value!r}, not true or false")
    return tokenizer_from_pieces(tokens, scores, types, bos_id=ids.get("tokenizer.ggml.bos_token_id"),
                                 eos_id=ids.get("tokenizer.ggml.eos_token_id"),
                                 add_bos=flags["tokenizer.ggml.add_bos_token"], chat_template=template,
                                 pad_id=ids.get("tokenizer.ggml.padding_token_id", 0),
                                 add_space_prefix=flags["tokenizer.ggml.add_space_prefix"])


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_id: int | None
    add_bos: bool
    stop_ids: frozenset[int]  # end-of-turn / end-of-sequence
    pad_id: int
    chat_template: str | None

    @classmethod
    def from_gguf_fields(cls, fields: dict, vocab_size: int) -> "Tokenizer":
        """The tokenizer a GGUF file describes, each field checked: ids must fit the model's
        vocab_size rows of embeddings."""
        kind = fields.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise UserError(f"unsupported tokenizer model {kind!r}: only byte-level BPE ('gpt2') and "
                            f"SentencePiece ('llama') are supported")
        tokens = _strings(fields, "tokenizer.ggml.tokens")
        if not 0 < len(tokens) <= vocab_size:
            raise UserError(f"the GGUF tokenizer has {len(tokens)} tokens, but the model has {vocab_size} embeddings")
        ids = {k: fields[k] for k in _ID_FIELDS if k in fields}
        for key, value in ids.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens):
                raise UserError(f"the GGUF tokenizer's {key} is {value!r}: not a token of its {len(tokens)}")
        types = fields.get("tokenizer.ggml.token_type", [])
        if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
            raise UserError("the GGUF tokenizer's token types are damaged")
        template = fields.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise UserError("the GGUF file's chat template is not text")
        stop = {ids[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in ids}
        if kind == "llama":
            return replace(_sentencepiece_from_fields(fields, tokens, types, ids, template), stop_ids=frozenset(stop))
        merges = [tuple(m.split(" ", 1)) for m in _strings(fields, "tokenizer.ggml.merges")]
        if any(len(m) != 2 for m in merges):
            raise UserError("the GGUF tokenizer's merges are damaged (a merge is two pieces and a space)")
        try:
            backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                             ignore_merges=fields.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")))
        except Exception as e:  # e.g. a merge of pieces that are not in the vocabulary
            raise UserError(f"the GGUF tokenizer is damaged ({e})") from None
        backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in _SPECIAL_TYPES])
        return cls(backend=backend, bos_id=ids.get("tokenizer.ggml.bos_token_id"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   stop_ids=frozenset(stop), pad_id=ids.get("tokenizer.ggml.padding_token_id", 0),
                   chat_template=template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as text (byte-level pieces decoded)."""
        return self.decode([token_id])

    def apply_chat_template(self, user_message: str, system: str | None = None) -> str:
        """The prompt as the chat model was trained to see it, ready for its reply (with a system
        prompt, where `system` is given)."""
        if not self.chat_template:
            raise UserError("this model has no chat template; use --raw")
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(min(self.stop_ids)) if self.stop_ids else ""
        return render_chat_template(self.chat_template, user_message, bos or "", eos or "", system)
