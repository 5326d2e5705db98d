"""SentencePiece vocabularies (Llama 1 and 2): Meta's tokenizer.model, and the same pieces in a
GGUF file, rebuilt as BPE in the `tokenizers` library.

A SentencePiece model is a protobuf message (ModelProto). Its few fields we need are read here by
hand, so that neither `protobuf` nor `sentencepiece` is needed at run time.

SentencePiece's BPE has no merge list either: to encode, it merges, again and again, the adjacent
pair of pieces whose concatenation is the piece of highest score. A merge list that does the same
holds every split of every normal piece into two normal pieces, ranked by the whole piece's score.
Characters without a piece of their own become their UTF-8 bytes (<0xNN> pieces: byte fallback).
The text is prepared as SentencePiece's (and llama.cpp's) Llama tokenizer prepares it: a space
before it (the "dummy prefix") and every space written as "▁"; the control pieces (<s>, </s>) are
special tokens, so that a chat template's "<s>" becomes its id.
"""
import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

from .chat_formats import LLAMA2
from .errors import UserError
from .tokenizer import Tokenizer, read_model_file

# SentencePiece's piece types, which llama.cpp's token types copy.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
# Pieces matched in the text as a whole before anything else, as llama.cpp does with special tokens parsed.
_SPECIAL_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)
_BPE = 2  # TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char
SPACE = "▁"  # U+2581, how SentencePiece writes a space


class _Damaged(Exception):
    """The bytes are not the protobuf message they should be."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The base-128 number at data[pos:] (7 bits a byte, low bits first), and the position after it."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _Damaged("it ends inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _Damaged("a number is longer than 10 bytes")


def _fields(data: bytes):
    """(field number, wire type, value) for each field of one protobuf message: a whole number for
    wire type 0 (varint), the raw bytes for 1 (8 bytes), 2 (length-delimited) and 5 (4 bytes)."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        else:
            if wire == 2:
                size, pos = _varint(data, pos)
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
            else:
                raise _Damaged(f"field {number} has wire type {wire}, which SentencePiece does not use")
            if pos + size > len(data):
                raise _Damaged(f"field {number} runs past the end")
            value, pos = data[pos:pos + size], pos + size
        if number == 0:
            raise _Damaged("a field numbered 0")
        yield number, wire, value


def _expect(wire: int, wanted: int, what: str):
    if wire != wanted:
        raise _Damaged(f"{what} is stored with wire type {wire}, not {wanted}")


def _piece(message: bytes) -> tuple[str, float, int]:
    """One SentencePiece message: piece = 1 (text), score = 2 (float32), type = 3 (NORMAL by default)."""
    piece, score, kind = None, 0.0, NORMAL
    for number, wire, value in _fields(message):
        if number == 1:
            _expect(wire, 2, "a piece's text")
            try:
                piece = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _Damaged("a piece is not UTF-8 text") from None
        elif number == 2:
            _expect(wire, 5, "a piece's score")
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            _expect(wire, 0, "a piece's type")
            kind = value
    if not piece:
        raise _Damaged("a piece has no text")
    return piece, score, kind


def _unsupported(trainer: bytes, normalizer: bytes) -> str | None:
    """Why a model's settings differ from the Llama tokenizer's this rebuild follows, or None.
    TrainerSpec.model_type = 3; NormalizerSpec: precompiled_charsmap = 2 (a Unicode normalization
    table; Llama has none), add_dummy_prefix = 3, remove_extra_whitespaces = 4, escape_whitespaces = 5."""
    model_type = next((v for n, w, v in _fields(trainer) if n == 3 and w == 0), 1)
    if model_type != _BPE:
        return f"it is a {({1: 'unigram', 3: 'word', 4: 'char'}).get(model_type, 'unknown')} model, not BPE"
    settings = {n: v for n, w, v in _fields(normalizer)}
    if settings.get(2):
        return "it normalizes Unicode text (a precompiled_charsmap)"
    if not settings.get(3, True) or not settings.get(5, True):
        return "it does not mark spaces as '▁' with one before the text"
    if settings.get(4, True):
        return "it removes extra spaces"
    return None


def read_sentencepiece_model(path: Path) -> tuple[list[str], list[float], list[int]]:
    """The pieces, scores and types of a SentencePiece BPE model file. ModelProto: pieces = 1
    (repeated), trainer_spec = 2, normalizer_spec = 3; every other field is skipped."""
    data = read_model_file(path)
    pieces, scores, types, trainer, normalizer = [], [], [], b"", b""
    try:
        for number, wire, value in _fields(data):
            if number == 1:
                _expect(wire, 2, "a piece")
                piece, score, kind = _piece(value)
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2:
                _expect(wire, 2, "the trainer settings")
                trainer = value
            elif number == 3:
                _expect(wire, 2, "the normalizer settings")
                normalizer = value
        if pieces and not (trainer and normalizer):  # SentencePiece writes both after the pieces
            raise _Damaged("its settings are missing: a file cut short?")
        reason = _unsupported(trainer, normalizer)
    except _Damaged as e:
        raise UserError(f"{path} is not a SentencePiece model, or it is damaged ({e})") from None
    if not pieces:
        raise UserError(f"{path} holds no SentencePiece pieces, so it is not a tokenizer")
    if reason:
        raise UserError(f"{path} is a SentencePiece model that this program cannot rebuild: {reason}")
    return pieces, scores, types


def _merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces: the higher the whole piece's score, the
    earlier its merges (then by id, as SentencePiece's scores fall with the id)."""
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_from_pieces(pieces: list[str], scores: list[float], types: list[int], bos_id: int | None,
                          eos_id: int | None, add_bos: bool, chat_template: str | None, *, pad_id: int = -1,
                          add_space_prefix: bool = True) -> Tokenizer:
    """A SentencePiece BPE vocabulary as a Tokenizer: stop at eos_id; pad_id -1 (none), as Meta's
    Llama 2 code fills its tokens tensor; `add_space_prefix` False leaves out the dummy prefix."""
    if not len(pieces) == len(scores) == len(types):
        raise UserError(f"the SentencePiece vocabulary has {len(pieces)} pieces, {len(scores)} scores and "
                        f"{len(types)} types: one of each per piece is needed")
    strange = next((i for i, t in enumerate(types) if t not in _TYPES), None)
    if strange is not None:
        raise UserError(f"the piece {pieces[strange]!r} has type {types[strange]}, which SentencePiece does not have")
    vocab = {}
    for i, piece in enumerate(pieces):
        if vocab.setdefault(piece, i) != i:
            raise UserError(f"the SentencePiece vocabulary holds the piece {piece!r} twice (ids {vocab[piece]} "
                            f"and {i})")
    unknown = next((p for p, t in zip(pieces, types) if t == UNKNOWN), None)
    try:
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=_merges(pieces, scores, types), unk_token=unknown,
                                         fuse_unk=True, byte_fallback=True))
    except Exception as e:
        raise UserError(f"the SentencePiece vocabulary is damaged ({e})") from None
    prefix = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", SPACE)])
    # "▁" back to a space, <0xNN> pieces back to bytes, and the dummy prefix's space removed.
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(pieces, types) if t in _SPECIAL_TYPES])
    return Tokenizer(backend=backend, bos_id=bos_id, add_bos=add_bos,
                     stop_ids=frozenset([eos_id] if eos_id is not None else []), pad_id=pad_id,
                     chat_template=chat_template)


def tokenizer_from_sentencepiece(path: Path) -> Tokenizer:
    """Meta's Llama 2 tokenizer.model, with <s> before each prompt, </s> ending the turn and the
    Llama 2 chat format (which the file does not hold)."""
    pieces, scores, types = read_sentencepiece_model(path)
    ids = {p: i for i, p in enumerate(pieces)}
    if "<s>" not in ids or "</s>" not in ids:
        raise UserError(f"{path} has no <s> and </s> pieces, so it is not a Llama tokenizer")
    return tokenizer_from_pieces(pieces, scores, types, bos_id=ids["<s>"], eos_id=ids["</s>"], add_bos=True,
                                 chat_template=LLAMA2)
