"""The model's own tokenizer, rebuilt from the GGUF metadata with the `tokenizers`
library, and its chat template, rendered with Jinja as Hugging Face does."""
from dataclasses import dataclass

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

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


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_id: int | None
    add_bos: bool
    stop_ids: frozenset[int]  # end-of-turn / end-of-sequence
    pad_id: int
    chat_template: str | None

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(f"unsupported tokenizer model {kind!r}: only byte-level BPE ('gpt2') is supported")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         ignore_merges=fields.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")))
        backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in _SPECIAL_TYPES])
        stop = {fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                    "tokenizer.ggml.eom_token_id") if k in fields}
        bos = fields.get("tokenizer.ggml.bos_token_id")
        return cls(backend=backend, bos_id=bos, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   stop_ids=frozenset(stop), pad_id=fields.get("tokenizer.ggml.padding_token_id", 0),
                   chat_template=fields.get("tokenizer.chat_template"))

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

    def apply_chat_template(self, user_message: str) -> str:
        """The prompt as the chat model was trained to see it, ready for its reply."""
        if not self.chat_template:
            raise UserError("this model has no chat template; use --raw")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise UserError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(min(self.stop_ids)) if self.stop_ids else ""
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                bos_token=bos, eos_token=eos)
        except jinja2.TemplateError as e:
            raise UserError(f"the model's chat template failed: {e}") from None
