"""Meta's tokenizer.model files: Llama 3's tiktoken ranks, rebuilt as byte-level BPE in the
`tokenizers` library, and the helper that tells them from Llama 2's SentencePiece model.

Llama 3's file is text, one token a line: its bytes in base64, then its rank (its id). tiktoken has
no merge list: to encode a word, it merges, again and again, the adjacent pair of pieces whose
concatenation is the token of lowest rank, and a word that is a token as a whole is that token.
A BPE merge list that does the same holds every split of every token into two tokens, ranked by
the whole token's rank (a pair can meet in tiktoken however each half was built), and tells BPE to
take whole-word tokens first (ignore_merges).

Meta's 256 special tokens follow the ranks (<|begin_of_text|> = 128000), named as Meta's tokenizer.py
for Llama 3.1 (llama-models) names them, and as Hugging Face's tokenizer.json for Llama 3.1 to 3.3
does; Meta's later tokenizer.py, written for Llama 3.2 Vision, puts <|image|> at 128011 and shifts
the reserved names after it by one.
"""
import base64
import binascii
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

from .chat_formats import LLAMA3
from .errors import UserError
from .inputs import regular_file
from .sentencepiece_vocab import tokenizer_from_sentencepiece
from .tokenizer import Tokenizer, llama3_pre_tokenizer, read_model_file

_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# ... then the reserved ones from 2 on, 256 in all.
LLAMA3_SPECIALS = _NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED_SPECIALS))]
_PROTOBUF_START = 0x0A  # field 1 (a SentencePiece piece), length-delimited: how Llama 2's file begins


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet, in which byte-level BPE vocabularies are written: the printable
    bytes as themselves, the other 68 as the characters from U+0100 on, in byte order (a space is 'Ġ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


# bytes.decode("latin-1") gives one character per byte; this turns it into its byte-level character.
_TO_BYTE_LEVEL = dict(enumerate(_byte_level_chars()))


def read_ranks(path: Path) -> list[bytes]:
    """The tokens of a tiktoken ranks file, by rank: every line "base64-bytes rank", the ranks
    counting up from 0, every one of the 256 bytes a token of its own."""
    data = read_model_file(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a tiktoken ranks file (it is not text of base64 and numbers)") from None
    tokens, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path}, line {number}: not 'base64-token rank', so not a tiktoken ranks file")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except binascii.Error:
            raise UserError(f"{path}, line {number}: {parts[0][:20]!r} is not base64") from None
        if int(parts[1]) != len(tokens):
            raise UserError(f"{path}, line {number}: rank {parts[1]} where {len(tokens)} was due (the ranks "
                            f"must count up from 0)")
        if not token or token in seen:
            raise UserError(f"{path}, line {number}: the token {token!r} is empty or given twice")
        seen.add(token)
        tokens.append(token)
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} of the 256 single bytes (byte {missing[0]} first), "
                        f"which byte-level BPE needs as tokens")
    return tokens


def _merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, the lower the whole token's rank the earlier."""
    rank = {token: r for r, token in enumerate(tokens)}
    merges = []
    for token in tokens:
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))]
        merges += sorted(((a, b) for a, b in splits if a in rank and b in rank), key=lambda m: (rank[m[0]], rank[m[1]]))
    return merges


def tokenizer_from_tiktoken(path: Path) -> Tokenizer:
    """Meta's Llama 3 tokenizer.model (any tiktoken ranks file, with Meta's special tokens after
    its ranks): <|begin_of_text|> before each prompt, <|end_of_text|>, <|eom_id|> and <|eot_id|>
    ending the turn, the Llama 3 chat format (which the file does not hold)."""
    tokens = read_ranks(path)
    as_text = [token.decode("latin-1").translate(_TO_BYTE_LEVEL) for token in tokens]
    merges = [(a.decode("latin-1").translate(_TO_BYTE_LEVEL), b.decode("latin-1").translate(_TO_BYTE_LEVEL))
              for a, b in _merges(tokens)]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(as_text)}, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = llama3_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in LLAMA3_SPECIALS])
    special = {name: len(tokens) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens) + len(LLAMA3_SPECIALS):
        raise UserError(f"{path} already holds one of Meta's special tokens among its ranks, so it is not a "
                        f"Llama 3 tokenizer")
    return Tokenizer(backend=backend, bos_id=special["<|begin_of_text|>"], add_bos=True,
                     stop_ids=frozenset(special[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
                     pad_id=special["<|finetune_right_pad_id|>"], chat_template=LLAMA3)


def tokenizer_from_model_file(path: Path) -> Tokenizer:
    """A tokenizer.model of either kind, told apart by its first byte: Llama 2's SentencePiece model
    is a protobuf message, which starts with 0x0A; Llama 3's tiktoken ranks are base64 text."""
    with open(regular_file(path, "tokenizer file"), "rb") as f:
        first = f.read(1)
    if first == bytes([_PROTOBUF_START]):
        return tokenizer_from_sentencepiece(path)
    return tokenizer_from_tiktoken(path)
