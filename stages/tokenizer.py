"""The model's own tokenizer, rebuilt from the GGUF metadata with the `tokenizers`
library, and its chat template, rendered with Jinja as Hugging Face does."""
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .chat_template import render_chat_template
from .errors import UserError

# llama.cpp's token types: 3 = control (<|im_start|> ...), 4 = user-defined.
_SPECIAL_TYPES = (3, 4)

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    """The pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Every digit on its own, then the GPT-2 split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UserError(f"unsupported tokenizer pre-type {pre!r} (supported: smollm, starcoder, gpt2, llama-bpe)")


_ID_FIELDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id")


def _strings(fields: dict, key: str) -> list[str]:
    value = fields.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"the GGUF file's tokenizer lacks {key}, or it is not a list of strings")
    return value


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
        if kind != "gpt2":
            raise UserError(f"unsupported tokenizer model {kind!r}: only byte-level BPE ('gpt2') is supported")
        tokens = _strings(fields, "tokenizer.ggml.tokens")
        if not 0 < len(tokens) <= vocab_size:
            raise UserError(f"the GGUF tokenizer has {len(tokens)} tokens, but the model has {vocab_size} embeddings")
        merges = [tuple(m.split(" ", 1)) for m in _strings(fields, "tokenizer.ggml.merges")]
        if any(len(m) != 2 for m in merges):
            raise UserError("the GGUF tokenizer's merges are damaged (a merge is two pieces and a space)")
        ids = {k: fields[k] for k in _ID_FIELDS if k in fields}
        for key, value in ids.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens):
                raise UserError(f"the GGUF tokenizer's {key} is {value!r}: not a token of its {len(tokens)}")
        if not isinstance(fields.get("tokenizer.ggml.token_type", []), list) or \
                not all(isinstance(t, int) for t in fields.get("tokenizer.ggml.token_type", [])):
            raise UserError("the GGUF tokenizer's token types are damaged")
        template = fields.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise UserError("the GGUF file's chat template is not text")
        try:
            backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                             ignore_merges=fields.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")))
        except Exception as e:  # e.g. a merge of pieces that are not in the vocabulary
            raise UserError(f"the GGUF tokenizer is damaged ({e})") from None
        backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in _SPECIAL_TYPES])
        stop = {ids[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in ids}
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
