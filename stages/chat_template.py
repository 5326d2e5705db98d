"""Rendering a model's chat template (Jinja, as Hugging Face does) with bounds.

The template comes from the model file, so it is untrusted: Jinja's sandbox stops it from
reaching Python, but not from looping for hours or building a string of many gigabytes. It is
therefore rendered in a child process with a time limit and a memory limit, and its output
is bounded too. The child costs about a tenth of a second, once per prompt.
"""
import functools
import json
import subprocess
import sys

from .errors import UserError

SECONDS = 10
MEMORY_BYTES = 1 << 30
OUTPUT_CHARS = 1 << 24

_CHILD = r"""
import json, sys
import jinja2, jinja2.sandbox
job = json.loads(sys.stdin.read())

class TemplateRaised(Exception):
    pass

def raise_exception(message):
    raise TemplateRaised(str(message))

env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
try:
    text = env.from_string(job["template"]).render(
        messages=([{"role": "system", "content": job["system"]}] if job["system"] is not None else [])
                 + [{"role": "user", "content": job["message"]}], add_generation_prompt=True,
        bos_token=job["bos"], eos_token=job["eos"])
    answer = {"text": text} if len(text) <= job["limit"] else {"error": f"it built a text of {len(text)} characters"}
except TemplateRaised as e:
    answer = {"error": f"it refused: {e}"}
except MemoryError:
    answer = {"error": "it needed more memory than a chat template may use"}
except Exception as e:
    answer = {"error": f"{type(e).__name__}: {e}"}
sys.stdout.write(json.dumps(answer))
"""


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


@functools.lru_cache(maxsize=64)
def render_chat_template(template: str, user_message: str, bos: str, eos: str, system: str | None = None) -> str:
    """The prompt as the chat model was trained to see it, ready for its reply; `system` is the
    system prompt (None: the template's own default, where it has one)."""
    job = json.dumps({"template": template, "message": user_message, "system": system, "bos": bos, "eos": eos,
                      "limit": OUTPUT_CHARS + len(user_message) + len(system or "")})
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=job, capture_output=True, text=True,
                              timeout=SECONDS, preexec_fn=_limit_memory if sys.platform != "win32" else None)
    except subprocess.TimeoutExpired:
        raise UserError(f"the model's chat template did not finish in {SECONDS} s (it may never end): "
                        f"use --raw to feed the prompt without it") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"error": f"the renderer stopped ({(done.stderr.strip().splitlines() or ['no output'])[-1]})"}
    if "error" in answer:
        raise UserError(f"the model's chat template failed: {answer['error']} (use --raw to do without it)")
    return answer["text"]
