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
     the plain stages;
  6. TransformerLens' run_with_cache against its own forward on the same weights and prompt, beside
     our prompt step with --capture all (an optional extra: pip install -e '.[bench]');
  7. a training step (`train`, B = 2, T = 64, AdamW): untraced, traced with the default capture and
     with --capture all, and the peak memory of a traced training run.

`--only implementations` (or any of the result's section names) measures that part alone and
updates it in the results file.
"""
import argparse
import importlib.metadata
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import stages  # noqa: E402
from stages import PIPELINES, Sampling, generate  # noqa: E402
from stages.pipelines import IMPLEMENTATIONS  # noqa: E402
from stages.embedded import embedded_model_path  # noqa: E402
from stages.hooks import recording  # noqa: E402
from stages.kv_cache import KVCache  # noqa: E402
from trace import Capture, traced_run  # noqa: E402
from trace.heap import generation_heap  # noqa: E402
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


def run_of(model, ids, capture: Capture | None, n: int):
    """A run generating n tokens, traced with `capture` (None: untraced)."""
    if capture is None:
        return lambda: generate(model, ids, n)

    def traced():
        recorder = Recorder(capture)
        with recording(recorder), generation_heap():  # as trace.run does
            generate(model, ids, n)
        return recorder.records  # (the last step's statistics included)
    return traced


def tracing_cost(model, ids, repeats) -> dict:
    """The traced run against the untraced one: prompt step alone, and with NEW_TOKENS decoded."""
    out = {}
    for label, n in (("prompt_step", 1), ("with_decode", NEW_TOKENS)):
        t = alternate({"none": run_of(model, ids, None, n), "default": run_of(model, ids, Capture.selected(), n),
                       "all": run_of(model, ids, Capture.everything(), n)}, repeats)
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

    prefill = alternate({name: run(PIPELINES[name], 1) for name in IMPLEMENTATIONS}, repeats)
    whole = alternate({name: run(PIPELINES[name], NEW_TOKENS) for name in IMPLEMENTATIONS}, repeats)
    decode = {name: (NEW_TOKENS - 1) / (whole[name] - prefill[name]) for name in IMPLEMENTATIONS}
    return {name: {"prompt_step_s": prefill[name], "decode_tokens_per_s": decode[name],
                   "prompt_step_ratio_to_plain": prefill[name] / prefill["plain"],
                   "decode_ratio_to_plain": decode[name] / decode["plain"]} for name in IMPLEMENTATIONS}


def transformer_lens(model, path: Path, ids, repeats) -> dict:
    """TransformerLens' run_with_cache (its TransformerBridge on the same weights, from a Hugging Face
    folder written here) against its own forward, beside our prompt step with --capture all."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return {"missing": "pip install -e '.[bench]' (transformer_lens) to measure it"}
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"})
    plain = LlamaForCausalLM(config)  # a GGUF-loaded model cannot be saved as it is
    plain.load_state_dict(hf.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        plain.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32)
    tokens = torch.tensor([ids])

    def forward():
        with torch.inference_mode():
            bridge(tokens)

    def with_cache():
        with torch.inference_mode():
            return bridge.run_with_cache(tokens)[1]

    cache = with_cache()
    cache_bytes = sum(v.numel() * v.element_size() for v in cache.values())
    distinct = sum(s.nbytes() for s in {v.untyped_storage().data_ptr(): v.untyped_storage()
                                        for v in cache.values()}.values())
    del cache
    t = alternate({"forward": forward, "run_with_cache": with_cache,
                   "ours untraced": run_of(model, ids, None, 1), "ours all": run_of(model, ids, Capture.everything(), 1)},
                  repeats)
    recorder = Recorder(Capture.everything())
    with recording(recorder):
        generate(model, ids, 1)
    return {"version": importlib.metadata.version("transformer_lens"),
            "run_with_cache_ratio": t["run_with_cache"] / t["forward"], "cache_bytes": cache_bytes,
            "cache_distinct_bytes": distinct, "ours_all_ratio": t["ours all"] / t["ours untraced"],
            "ours_all_kept_bytes": recorder.kept_bytes}


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
    return {"cold_fetch_s": cold, "model_cached_s": cached, "main_command_peak_rss_bytes": peak_rss("run", question)}


def peak_rss(*command: str) -> int:
    """Peak resident memory, in bytes, of `python -m trace COMMAND...`."""
    # A fresh parent per measurement: its children's peak is this command's alone.
    peak = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], "
                           "check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
                           ".ru_maxrss)", sys.executable, "-m", "trace", *command],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    return int(peak.stdout) * 1024


TRAIN_STEPS = 2


def training(path: Path, repeats: int) -> dict:
    """Seconds per training step of a model of its own (training changes the weights): untraced, traced
    with the default capture and with --capture all; and the peak RSS of the `train` command."""
    from stages.training import TrainingSetup, train
    from trace.training_run import read_training_text, traced_training
    model = stages.load_model(path, device="cpu")
    text = read_training_text(None)
    ids = model.tokenizer.encode(text, add_bos=False)
    setup = TrainingSetup(batch=2, seq=64, steps=TRAIN_STEPS)
    t = alternate({"none": lambda: train(model, ids, setup),
                   "default": lambda: traced_training(model, text, setup),
                   "all": lambda: traced_training(model, text, setup, Capture.everything())}, repeats)
    return {"batch": 2, "seq": 64, "untraced_step_s": t["none"] / TRAIN_STEPS,
            "default_step_s": t["default"] / TRAIN_STEPS, "all_step_s": t["all"] / TRAIN_STEPS,
            "default_ratio": t["default"] / t["none"], "all_ratio": t["all"] / t["none"],
            "train_command_peak_rss_bytes": peak_rss("train", "--steps", str(TRAIN_STEPS)),
            # (memory must not grow with the steps)
            "train_command_peak_rss_bytes_16_steps": peak_rss("train", "--steps", "16")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    sections = ("speed", "tracing", "memory", "first_table", "implementations", "transformer_lens", "training")
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
        "transformer_lens": lambda: transformer_lens(model, path, ids, args.repeats),
        "training": lambda: training(path, args.repeats),
    }
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    machine_of_the_rest = results.get("machine")  # (the other parts were measured then: their date stays)
    results |= {"machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
                "prompt_tokens": len(ids), "new_tokens": NEW_TOKENS}
    for section in [args.only] if args.only else sections:
        results[section] = measures[section]()
    if args.only and machine_of_the_rest is not None:
        results[args.only]["machine"], results["machine"] = results["machine"], machine_of_the_rest
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if any(section not in results for section in sections):
        print(f"wrote {args.out} (run without --only for every part)")
        return 0
    table = Table(title=f"llama-trace benchmarks ({results['machine']['cpus']} CPUs, "
                        f"{results['machine']['torch_threads']} torch threads)", title_justify="left")
    for column in ("measure", "value"):
        table.add_column(column)
    s, tr, mem, ft = results["speed"], results["tracing"], results["memory"], results["first_table"]
    packed, lens, train = results["implementations"]["packed"], results["transformer_lens"], results["training"]
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
        ("TransformerLens run_with_cache / its forward, 200-token prompt; what it keeps",
         "not measured: " + lens["missing"] if "missing" in lens else
         f"{lens['run_with_cache_ratio']:.2f}x, {lens['cache_distinct_bytes'] / 2**20:.0f} MiB"),
        ("ours, --capture all / untraced, same prompt; what it keeps",
         "" if "missing" in lens else f"{lens['ours_all_ratio']:.2f}x, {lens['ours_all_kept_bytes'] / 2**20:.0f} MiB"),
        ("--impl packed / plain, untraced: prompt step, decode tokens/s",
         f"{packed['prompt_step_ratio_to_plain']:.2f}x time, {packed['decode_ratio_to_plain']:.2f}x tokens/s"),
        ("training step, B=2 T=64, AdamW: untraced; traced default, all",
         f"{train['untraced_step_s']:.2f} s; {train['default_step_s']:.2f} s ({train['default_ratio']:.2f}x), "
         f"{train['all_step_s']:.2f} s ({train['all_ratio']:.2f}x)"),
        ("peak memory (RSS) of `train --steps 2`, `--steps 16`",
         f"{train['train_command_peak_rss_bytes'] / 1e9:.2f} GB, "
         f"{train['train_command_peak_rss_bytes_16_steps'] / 1e9:.2f} GB"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
