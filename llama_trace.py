"""Makes `import trace` reach this project's package, not the standard library's.

`trace` is also a standard-library module, and the standard library comes
before site-packages (and before an editable install) on sys.path. From the
repository root, `python -m trace` finds ours because the current directory
comes first; anywhere else (pytest, a Jupyter kernel, an installed copy),
`import llama_trace` first. The `llama-trace` command does it for you, and so
does `python -m llama_trace`.

`install_python_m_hook` (run by setup.sh) makes `python -m trace` reach ours
from any folder too, in the environment it is installed in: a .pth file that
imports this module when, and only when, Python was started as `python -m trace`.
"""
import importlib.util
import sys
from pathlib import Path
from typing import NoReturn

_PACKAGE = Path(__file__).resolve().parent / "trace"


def _install() -> None:
    loaded = sys.modules.get("trace")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == _PACKAGE:
        return
    for name in [n for n in sys.modules if n == "trace" or n.startswith("trace.")]:
        del sys.modules[name]  # the standard library's, if something imported it already
    spec = importlib.util.spec_from_file_location("trace", _PACKAGE / "__init__.py",
                                                  submodule_search_locations=[str(_PACKAGE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["trace"] = module
    spec.loader.exec_module(module)


_install()


_HOOK = ('import sys; argv = getattr(sys, "orig_argv", []); '
         '"-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["trace"] '
         'and __import__("llama_trace")\n')


def install_python_m_hook() -> Path:
    """Write the .pth file that routes `python -m trace` here, into this environment's site-packages."""
    import sysconfig
    path = Path(sysconfig.get_paths()["purelib"]) / "llama_trace_python_m.pth"
    path.write_text(_HOOK)
    return path


def main() -> NoReturn:
    """The `llama-trace` command: `python -m trace` from anywhere. It ends the process."""
    from trace.cli import run_as_command
    run_as_command()


if __name__ == "__main__":
    main()
