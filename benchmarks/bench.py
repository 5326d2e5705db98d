"""Speed and memory of llama-trace on the embedded model, measured side by side in one run.

    python benchmarks/bench.py [--repeats 5] [--out benchmarks/results.json]

Measures, alternating the things compared and reporting medians and ratios
(a loaded 2-core machine can slow torch down several times):
  1. untraced generation (prompt step, decode tokens/s) against Hugging Face
     transformers' generate on the same weights, dtype and threads;
  2. the traced run, default capture and --capture all, against the untraced one,
     on a 200-token prompt;
  3. the values a trace keeps (bytes per token per layer) and the saved file's size;
  4. time from the command to the first table, without and with the model cached, and the peak
     memory of the README's main command;
  5. the implementations untraced: the serving engine's packed layers (--impl packed) against
     the plain stages.

`--only implementations` (or any of the result's section names) measures that part alone and
updates it in the results file.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llama_trace  # noqa: E402,F401  (our `trace`, not the standard library's)
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import stages  # noqa: E402
from stages import PIPELINES, Sampling, generate  # noqa: E402
from stages.embedded import embedded_model_path  # noqa: E402
from stages.hooks import recording  # noqa: E402
from stages.kv_cache import KVCache  # noqa: E402
from trace import Capture, traced_run  # noqa: E402
from trace.recorder import Recorder  # noqa: E402
from trace.tracefile import save_trace  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 200, 32


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(candidates: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, run in turn (a, b, c, a, b, c, ...) after one warm-up each."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def prompt_ids(model) -> list[int]:
    text = " ".join(f"Sentence {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
    return model.tokenizer.encode(text, add_bos=False)[:PROMPT_TOKENS]


def our_prefill(model, ids):
    caches = [KVCache.empty(len(ids) + 1, model.config.n_kv_heads, model.config.head_dim, model.device,
                            model.dtype) for _ in range(model.config.n_layers)]
    with torch.inference_mode():
        stages.forward_step(model, torch.tensor(ids), 0, caches, Sampling(), None)


def speed(model, hf, ids, repeats) -> dict:
    """Untraced: ours against transformers, prompt step and whole generation of NEW_TOKENS."""
    tokens = torch.tensor([ids])

    def hf_prefill():
        with torch.inference_mode():
            hf(tokens, use_cache=True)

    def hf_generate():
        with torch.inference_mode():
            hf.generate(tokens, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                        pad_token_id=2)

    def ours_generate():
        n = len(generate(model, ids, NEW_TOKENS))
        assert n == NEW_TOKENS, n  # the comparison needs the same number of tokens

    t = alternate({"ours prefill": lambda: our_prefill(model, ids), "hf prefill": hf_prefill,
                   "ours generate": ours_generate, "hf generate": hf_generate}, repeats)
    decode = {k: (NEW_TOKENS - 1) / (t[f"{k} generate"] - t[f"{k} prefill"]) for k in ("ours", "hf")}
    return {"prompt_step_s": {"ours": t["ours prefill"], "transformers": t["hf prefill"]},
            "decode_tokens_per_s": {"ours": decode["ours"], "transformers": decode["hf"]},
            "prompt_step_ratio": t["ours prefill"] / t["hf prefill"],
            "decode_ratio": decode["ours"] / decode["hf"]}


def tracing_cost(model, ids, repeats) -> dict:
    """The traced run against the untraced one: prompt step alone, and with NEW_TOKENS decoded."""
    def run(capture, n):
        if capture is None:
            return lambda: generate(model, ids, n)

        def traced():
            with recording(Recorder(capture)):
                generate(model, ids, n)
        return traced

    out = {}
    for label, n in (("prompt_step", 1), ("with_decode", NEW_TOKENS)):
        t = alternate({"none": run(None, n), "default": run(Capture.selected(), n),
                       "all": run(Capture.everything(), n)}, repeats)
        out[label] = {"untraced_s": t["none"], "default_ratio": t["default"] / t["none"],
                      "all_ratio": t["all"] / t["none"]}
    return out


def trace_memory(model, ids) -> dict:
    out = {}
    for label, capture in (("default", Capture.selected()), ("all", Capture.everything())):
        recorder = Recorder(capture)
        with recording(recorder):
            generate(model, ids, NEW_TOKENS)
        tokens = len(ids) + NEW_TOKENS
        with tempfile.TemporaryDirectory() as tmp:
            text = model.tokenizer.decode(ids)
            saved = save_trace(traced_run(model, text, chat=False, max_new_tokens=NEW_TOKENS, capture=capture),
                               Path(tmp) / "t.trace", force=False)
            size = saved.stat().st_size
        out[label] = {"kept_bytes": recorder.kept_bytes,
                      "bytes_per_token_per_layer": recorder.kept_bytes / tokens / model.config.n_layers,
                      "saved_file_bytes": size}
    return out


def implementations(model, ids, repeats) -> dict:
    """Each implementation untraced, against the plain one: the prompt step, and decode tokens/s."""
    def run(pipeline, n):
        return lambda: generate(model, ids, n, pipeline=pipeline)

    prefill = alternate({name: run(p, 1) for name, p in PIPELINES.items()}, repeats)
    whole = alternate({name: run(p, NEW_TOKENS) for name, p in PIPELINES.items()}, repeats)
    decode = {name: (NEW_TOKENS - 1) / (whole[name] - prefill[name]) for name in PIPELINES}
    return {name: {"prompt_step_s": prefill[name], "decode_tokens_per_s": decode[name],
                   "prompt_step_ratio_to_plain": prefill[name] / prefill["plain"],
                   "decode_ratio_to_plain": decode[name] / decode["plain"]} for name in PIPELINES}


def first_table(repeats: int) -> dict:
    """Wall time of `python -m trace run ... --max-new-tokens 1` until it exits, after printing the table;
    and the peak memory (RSS) of the README's main command, `python -m trace run "..."`, model cached."""
    question = "What is the capital of France?"

    def once(env, *extra):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trace", "run", question, *extra], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as empty:
        cold = once({**os.environ, "LLAMA_TRACE_CACHE": empty}, "--max-new-tokens", "1")  # fetches the model first
    cached = statistics.median(once(dict(os.environ), "--max-new-tokens", "1") for _ in range(repeats))
    # A fresh parent per measurement: its children's peak is this command's alone.
    peak = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], "
                           "check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
                           ".ru_maxrss)", sys.executable, "-m", "trace", "run", question],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    return {"cold_fetch_s": cold, "model_cached_s": cached, "main_command_peak_rss_bytes": int(peak.stdout) * 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    sections = ("speed", "tracing", "memory", "first_table", "implementations")
    parser.add_argument("--only", choices=sections, help="measure this part alone, keeping the rest of --out")
    args = parser.parse_args()
    path = embedded_model_path()
    model = stages.load_model(path, device="cpu")
    ids = prompt_ids(model)
    measures = {
        "speed": lambda: speed(model, AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval(), ids, args.repeats),
        "tracing": lambda: tracing_cost(model, ids, args.repeats),
        "memory": lambda: trace_memory(model, ids),
        "first_table": lambda: first_table(max(1, args.repeats // 2)),
        "implementations": lambda: implementations(model, ids, args.repeats),
    }
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results |= {"machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
                "prompt_tokens": len(ids), "new_tokens": NEW_TOKENS}
    for section in [args.only] if args.only else sections:
        results[section] = measures[section]()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if any(section not in results for section in sections):
        print(f"wrote {args.out} (run without --only for every part)")
        return 0
    table = Table(title=f"llama-trace benchmarks ({results['machine']['cpus']} CPUs, "
                        f"{results['machine']['torch_threads']} torch threads)", title_justify="left")
    for column in ("measure", "value"):
        table.add_column(column)
    s, tr, mem, ft = results["speed"], results["tracing"], results["memory"], results["first_table"]
    packed = results["implementations"]["packed"]
    rows = [
        (f"prompt step ({len(ids)} tokens): ours / transformers",
         f"{s['prompt_step_s']['ours']:.3f} s / {s['prompt_step_s']['transformers']:.3f} s "
         f"(ratio {s['prompt_step_ratio']:.2f})"),
        ("decode tokens/s: ours / transformers",
         f"{s['decode_tokens_per_s']['ours']:.1f} / {s['decode_tokens_per_s']['transformers']:.1f} "
         f"(ratio {s['decode_ratio']:.2f})"),
        ("traced / untraced, prompt step: default, --capture all",
         f"{tr['prompt_step']['default_ratio']:.2f}x, {tr['prompt_step']['all_ratio']:.2f}x"),
        (f"traced / untraced, with {NEW_TOKENS} decode steps: default, all",
         f"{tr['with_decode']['default_ratio']:.2f}x, {tr['with_decode']['all_ratio']:.2f}x"),
        ("values kept per token per layer: default, all",
         f"{mem['default']['bytes_per_token_per_layer'] / 1024:.1f} KiB, "
         f"{mem['all']['bytes_per_token_per_layer'] / 1024:.1f} KiB"),
        ("saved trace file: default, all",
         f"{mem['default']['saved_file_bytes'] / 2**20:.1f} MiB, {mem['all']['saved_file_bytes'] / 2**20:.1f} MiB"),
        ("command to first table: model fetched / cached",
         f"{ft['cold_fetch_s']:.1f} s / {ft['model_cached_s']:.1f} s"),
        ("peak memory (RSS) of the main command", f"{ft['main_command_peak_rss_bytes'] / 1e9:.2f} GB"),
        ("--impl packed / plain, untraced: prompt step, decode tokens/s",
         f"{packed['prompt_step_ratio_to_plain']:.2f}x time, {packed['decode_ratio_to_plain']:.2f}x tokens/s"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
