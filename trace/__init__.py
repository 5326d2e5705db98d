"""Recording and showing the 19 stages of a LLaMA forward pass.

This package shadows the standard library's `trace` module. `python -m trace`
from the repository root finds it; elsewhere, `import llama_trace` first.
"""
from .recorder import Capture, Recorder, TensorRecord
from .run import Trace, traced_run

__all__ = ["Capture", "Recorder", "TensorRecord", "Trace", "traced_run"]
