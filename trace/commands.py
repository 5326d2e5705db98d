"""What each command of `python -m trace` does, given its parsed arguments."""
import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from stages import PIPELINES, NoWeightsError, PLAIN, PRESETS, Sampling, UserError, check_length, load_model, tokenize
from stages.presets import DTYPE as PRESET_DTYPE
from stages.model import Model, resolve_device
from stages.pipelines import N_STAGES, TENSOR_PARALLEL
from stages.tensor_parallel import Shard, check_divisible, shard_weights
from stages.training import TrainingSetup
from stages.training_stages import check_has_gradient

from . import ranks
from .budget import estimate_bytes, free_bytes, memory_needs, training_bytes
from .compare import diff_table
from .diagram import FORMATS, drawing, packing_diagram, render
from .export import stages_to_json, trace_to_json
from .files import check_writable, write_output
from .recorder import Capture, Rule
from .run import Trace, traced_run
from .tables import model_line, packing_table, shapes_table, stage_detail, stages_table
from .tracefile import load_trace, save_trace
from .training_run import read_training_text, traced_training
from .values import counted

DEFAULT_PROMPT = "What is the capital of France?"


def plots():
    """trace.plots, imported when a figure is asked for: matplotlib takes a quarter of a second to import."""
    from . import plots as module
    return module


def _say(console: Console, text: str, style: str = "dim") -> None:
    """A line of text as it is: file names, model names and notes are never read as markup."""
    console.print(text, style=style, markup=False, highlight=False)


def _load(args, err: Console):
    with Progress(TextColumn("Loading model"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("load", total=None)
        dtype = args.dtype or (PRESET_DTYPE if args.model in PRESETS else "float32")
        return load_model(args.model, args.device, dtype,
                          progress=lambda done, total: bar.update(task, completed=done, total=total),
                          shapes_only=args.shapes_only)


def _output_format(path: Path, force: bool, formats: tuple[str, ...] = FORMATS) -> str:
    """The file format a file name asks for; checked before any work is done."""
    check_writable(path, force)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise UserError(f"cannot tell the format of {path}: use a name ending in " +
                        ", ".join(f".{f}" for f in formats))
    check_writable(path, force)
    return fmt


def _check_view(args, config, n_steps: int | None = None, training: bool = False) -> None:
    """The shown layer, head and step exist (a trace's `n_steps`: of generation, or of `training`)."""
    if args.layer >= config.n_layers:
        raise UserError(f"--layer {args.layer} does not exist: this model has layers 0-{config.n_layers - 1}")
    if getattr(args, "head", 0) >= config.n_heads:
        raise UserError(f"--head {args.head} does not exist: this model has query heads 0-{config.n_heads - 1}")
    if n_steps is not None and args.step >= n_steps:
        what = "the trace holds" if training else "generation stopped after"
        raise UserError(f"--step {args.step} does not exist: {what} {counted(n_steps, 'step')} (0-{n_steps - 1})")


def _capture(args, steps: int, steps_flag: str) -> Capture:
    """The capture policy the arguments ask for: the shown step and layer, what --plot needs, and
    --capture's rules; within --max-trace-mb, in --store-dtype. A run has `steps` steps (`steps_flag` says so)."""
    kw = {"max_bytes": args.max_trace_mb * 2**20,
          "store_dtype": getattr(torch, args.store_dtype) if args.store_dtype else None}
    if args.capture == "all":
        return Capture.everything(**kw)
    inference = args.command != "train"  # (a training figure shows the shown step and layer only)
    extra = plots().rules_for_plot(args.stage, args.step, args.layer) if args.plot and inference else ()
    if args.capture != "selected":
        try:
            rules = tuple(Rule.parse(text) for text in args.capture.split(";") if text.strip())
        except ValueError as e:
            raise UserError(f"--capture: {e}") from None
        for rule in rules:
            if rule.stages is not None and not 1 <= min(lo for lo, _ in rule.stages.spans) <= rule.stages.largest <= N_STAGES:
                raise UserError(f"--capture: stages are numbered 1-{N_STAGES}")
            if rule.steps is not None and rule.steps.largest >= steps:
                raise UserError(f"--capture: step {rule.steps.largest} does not exist: with {steps_flag} "
                                f"{steps} the steps are 0-{steps - 1}")
        extra += rules
    return Capture.selected(args.step, args.layer, *extra, **kw)


def _check_capture_layers(capture: Capture, config) -> None:
    for rule in capture.rules:
        if rule.layers is not None and rule.layers.largest >= config.n_layers:
            raise UserError(f"--capture: layer {rule.layers.largest} does not exist: this model has layers "
                            f"0-{config.n_layers - 1}")


def _figure(trace: Trace, args):
    """--plot's figure: of a training trace, the learning (or with --stage, a tensor beside its gradient)."""
    if trace.training is None:
        return plots().stage_figure(trace, args.stage, args.step, args.layer, args.head)
    from . import training_plots  # matplotlib: imported when a figure is asked for
    if args.stage:
        return training_plots.training_stage_figure(trace, args.stage, args.step, args.layer, args.head)
    return training_plots.training_figure(trace, args.step, args.layer, getattr(args, "weight", "wq"))


def _pictures(trace: Trace, shown: Trace, args, err: Console) -> None:
    """--diagram (every rank of `trace`, side by side) and --plot (the rank `shown`)."""
    if args.diagram:
        graph = drawing(args.stage, replace(trace, rank=shown.rank), args.step, args.layer)
        write_output(args.diagram, render(graph, _output_format(args.diagram, args.force)), args.force)
        _say(err, f"drew {args.diagram}")
    if args.plot:
        figure = _figure(shown, args)
        kind = _output_format(args.plot, args.force, plots().PLOT_FORMATS)
        write_output(args.plot, plots().figure_bytes(figure, kind), args.force)
        _say(err, f"plotted {args.plot}")


def _show(trace: Trace, args, out: Console, err: Console, needs: dict[str, int] | None = None) -> None:
    """What run shows after the answer: the same for a live trace and a saved one. `needs`: the
    memory a real run would take, for a shapes-only run. Of a tensor-parallel run, one rank's view."""
    whole = trace
    if trace.ranks > 1:
        trace = trace.of_rank(args.rank)
    for note in trace.notes:
        _say(err, f"note: {note}")
    _pictures(whole, trace, args, err)
    if args.json:
        answer = trace_to_json(trace, args.step, args.layer, args.stage)
        if needs is not None:
            answer["memory_bytes_of_a_real_run"] = needs
        print(json.dumps(answer))
        return
    out.print()
    if needs is not None:
        _say(out, f"{len(trace.prompt_ids)}-token prompt", style="none")
        _say(out, _needs_line(trace, needs, args.max_new_tokens), style="none")
    elif trace.training is not None:
        setup, steps = trace.training.setup, trace.training.steps
        _say(out, f"{counted(len(steps), 'training step')} of B={setup.batch} × T={setup.seq} tokens from a "
                  f"{len(trace.prompt_ids)}-token text in {trace.seconds:.2f} s · AdamW lr {setup.lr:g}, weight decay "
                  f"{setup.weight_decay:g}, " + (f"gradients clipped to norm {setup.clip:g}" if setup.clip else "no clipping"))
        _say(out, "loss by step: " + " → ".join(f"{s.loss:.4f}" for s in steps), style="bold")
        whole = setup.whole_batches(len(trace.prompt_ids))
        if len(steps) > 1 and not setup.same_batch:
            again = (f" The text holds {counted(whole, 'batch')}: from step {whole} on they are read again, and a "
                     f"falling loss there is partly the model remembering them." if len(steps) > whole else "")
            _say(out, "(each step reads the next batch of the text, so the losses are of different batches; with "
                      "--same-batch every step reads the first, and its loss falls as the model learns it)" + again)
    else:
        _say(out, f"{counted(len(trace.new_ids), 'new token')} from a {len(trace.prompt_ids)}-token prompt in "
                  f"{trace.seconds:.2f} s")
    _say(out, model_line(trace))
    if trace.rank is not None:
        backend = "nccl" if trace.device == "cuda" else "gloo"
        _say(out, f"tensor parallel: rank {trace.rank} of {trace.ranks} (--rank R) · torch.distributed, {backend}")
        _say(out, trace.heads_line())
    elif trace.pipeline != PLAIN.name and trace.training is None:
        _say(out, f"implementation: {PIPELINES[trace.pipeline].title} (--impl {trace.pipeline})")
    if trace.source:
        _say(out, f"weights: {trace.source}")
    out.print()
    out.print(stage_detail(trace, args.stage, args.step, args.layer, args.head) if args.stage
              else shapes_table(trace, args.step, args.layer))


def _check_outputs(args, training: bool = False, inputs: tuple[Path | None, ...] = ()) -> None:
    """Every output file is checked before the model runs: no work is lost to a bad name, and no file
    is written over another output or over one of the `inputs` (even with --force). A training
    trace's --plot has a figure without --stage."""
    if args.plot and not args.stage and not training:
        raise UserError("--plot needs --stage N: say which stage to plot")
    if args.plot and args.stage and training:
        check_has_gradient(args.stage)
    named = [(flag, path.resolve()) for flag, path in (("--diagram", args.diagram), ("--plot", args.plot),
                                                        ("--save", getattr(args, "save", None))) if path]
    for i, (flag, path) in enumerate(named):
        for other, same in named[i + 1:]:
            if path == same:
                raise UserError(f"{flag} and {other} name the same file, {path}: give each its own")
        if any(path == source.resolve() for source in inputs if source is not None):
            raise UserError(f"{flag} names {path}, which this command reads: give the output another name")
    if args.diagram:
        _output_format(args.diagram, args.force)
    if args.plot:
        _output_format(args.plot, args.force, plots().PLOT_FORMATS)
    if getattr(args, "save", None):
        check_writable(args.save, args.force)


def _check_shapes_only(args) -> None:
    """What a run without numbers can and cannot do, said before any work."""
    if args.tokens is not None and not args.shapes_only:
        raise UserError("--tokens stands in for a prompt in a shapes-only run: add --shapes-only, or give a prompt")
    if not args.shapes_only:
        return
    for flag, wanted in (("--save", args.save), ("--plot", args.plot), ("--estimate", args.estimate)):
        if wanted:
            raise UserError(f"{flag} needs the values of a real run: a shapes-only run computes none")
    if args.step:
        raise UserError("--step: a shapes-only run has the prompt step only (step 0)")


def _shapes_only_needs(trace: Trace, max_new_tokens: int, model) -> dict[str, int]:
    return memory_needs(trace.config, len(trace.prompt_ids), max_new_tokens, model.dtype, model.weights.tied)


def _needs_line(trace: Trace, need: dict[str, int], max_new_tokens: int) -> str:
    """What a real run of this model would need, in a line."""
    gib = {key: value / 2**30 for key, value in need.items()}
    return (f"Shapes only (torch's meta device: no weights read, no numbers). A real run in {trace.dtype} "
            f"needs {gib['weights']:.2f} GiB of weights ({need['parameters'] / 1e9:.2f} B parameters), "
            f"{gib['kv_cache'] * 1024:.1f} MiB of KV cache for {len(trace.prompt_ids)} + {max_new_tokens} "
            f"positions, and {gib['full_trace']:.2f} GiB for a trace that keeps every value (--capture all).")


def cmd_run(args, out: Console, err: Console) -> int:
    _check_shapes_only(args)
    if args.tokens is None and not (args.prompt or "").strip():
        raise UserError("the prompt is empty: give some text to start from")
    if args.raw and args.system is not None:
        raise UserError("--system goes into the chat template, which --raw leaves out")
    if args.step >= args.max_new_tokens:
        raise UserError(f"--step {args.step} does not exist: with --max-new-tokens {args.max_new_tokens} "
                        f"there are at most {args.max_new_tokens} steps (0-{args.max_new_tokens - 1})")
    _check_outputs(args)
    capture = _capture(args, args.max_new_tokens, "--max-new-tokens")
    started_as = ranks.rank_environment()
    if started_as is not None and started_as[1] > 1 and args.tp == 1:
        raise UserError(f"this process is one of {started_as[1]} ranks (WORLD_SIZE={started_as[1]}): add --tp "
                        f"{started_as[1]} to split the model over them")
    if args.rank >= args.tp:
        raise UserError(f"--rank {args.rank} does not exist: with --tp {args.tp} the ranks are 0-{args.tp - 1}"
                        if args.tp > 1 else f"--rank {args.rank} shows one rank of a tensor-parallel run: add --tp N")
    if args.tp > 1:
        _check_tensor_parallel(args)
        if started_as is None:  # the launcher: checks what it can without weights, then starts the ranks
            resolve_device(args.device)
            config = load_model(args.model, shapes_only=True).config
            _check_view(args, config)
            _check_capture_layers(capture, config)
            check_divisible(config, args.tp)
            _check_rank_head(args, config, args.tp)
            return ranks.launch(args.argv, args.tp, err)
        shard = ranks.join(args.tp, resolve_device(args.device), args.timeout)
        try:
            return _run(args, out, err, capture, shard)
        finally:
            ranks.leave()
    return _run(args, out, err, capture, None)


def _check_tensor_parallel(args) -> None:
    for flag, wanted in (("--shapes-only", args.shapes_only), ("--estimate", args.estimate),
                         ("--impl packed", args.impl != PLAIN.name)):
        if wanted:
            raise UserError(f"--tp runs the plain stages split over ranks; it does not combine with {flag}")
    if args.model in PRESETS:
        raise UserError(f"--tp runs a model's weights; the preset {args.model} has none (it shows shapes only)")


def _check_rank_head(args, config, ranks: int) -> None:
    """--head of a tensor-parallel run names one of the shown rank's own heads (H/N of them)."""
    local_heads = config.n_heads // ranks
    if args.head >= local_heads:
        first = args.rank * local_heads
        raise UserError(f"--head {args.head}: rank {args.rank} holds {local_heads} query heads, numbered "
                        f"0-{local_heads - 1} (the model's heads {first}-{first + local_heads - 1})")


def _run(args, out: Console, err: Console, capture: Capture, shard: Shard | None) -> int:
    """The run itself: in one process, or as one rank of a tensor-parallel run (`shard`)."""
    model = _load(args, err)
    _check_view(args, model.config)
    _check_capture_layers(capture, model.config)
    if shard is not None:
        check_divisible(model.config, shard.world)
        _check_rank_head(args, model.config, shard.world)
        model = Model(model.name, model.config, shard_weights(model.weights, shard), model.tokenizer, model.source)
    if model.tokenizer is None and args.tokens is None:
        raise UserError(f"{model.name} comes without a tokenizer: say how long the prompt is with --tokens N")
    chat = args.tokens is None and not args.raw and model.tokenizer.chat_template is not None
    if args.tokens is None and not args.raw and not chat:
        _say(err, "note: this model has no chat template, so the prompt is fed as it is")
    if args.estimate:
        prompt_len = len(tokenize(model.tokenizer, args.prompt, chat))
        check_length(prompt_len, args.max_new_tokens, model.config.max_seq_len)
        size = estimate_bytes(model.config, prompt_len, args.max_new_tokens, capture, model.dtype,
                              PIPELINES[args.impl].stages)
        over = (": over the budget, so values beyond it would keep statistics only"
                if size > args.max_trace_mb * 2**20 else "")
        _say(out, f"capture {args.capture!r} would keep about {size / 2**20:.1f} MB of values for this "
                  f"{prompt_len}-token prompt and up to {args.max_new_tokens} new tokens "
                  f"(budget {args.max_trace_mb} MB){over}", style="none")
        return 0
    seed = args.seed if shard is None or args.temperature == 0 else ranks.shared_seed(args.seed)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)
    streamed: list[str] = []
    quiet = args.json or (shard is not None and shard.rank != 0)  # one rank speaks for all

    def stream(text: str) -> None:
        streamed.append(text)
        out.print(text, end="", markup=False, highlight=False)

    pipeline = PIPELINES[args.impl] if shard is None else TENSOR_PARALLEL
    try:
        trace = traced_run(model, args.prompt or "", chat=chat, max_new_tokens=args.max_new_tokens,
                           sampling=sampling, capture=capture, on_text=None if quiet else stream,
                           system=args.system, stand_in_tokens=args.tokens, pipeline=pipeline)
        if shard is not None:
            trace = ranks.gather_trace(trace, shard)
    except RuntimeError as e:  # what torch.distributed raises when a peer is gone or silent
        if shard is None:
            raise
        raise ranks.lost(shard.rank, "lost the other ranks", e) from None
    if trace is None:  # a rank other than 0: rank 0 shows the whole run
        return 0
    if not args.json:
        out.print(trace.answer[len("".join(streamed)):], end="", markup=False, highlight=False)
    _check_view(args, model.config, trace.n_steps)
    if args.save:
        save_trace(trace, args.save, args.force)
        _say(err, f"saved the trace to {args.save}")
    needs = _shapes_only_needs(trace, args.max_new_tokens, model) if trace.shapes_only else None
    _show(trace, args, out, err, needs)
    return 0


def cmd_train(args, out: Console, err: Console) -> int:
    if args.step >= args.steps:
        raise UserError(f"--step {args.step} does not exist: with --steps {args.steps} the steps are 0-{args.steps - 1}")
    _check_outputs(args, training=True, inputs=(args.text,))
    capture = _capture(args, args.steps, "--steps")
    setup = TrainingSetup(batch=args.batch, seq=args.seq, steps=args.steps, lr=args.lr,
                          weight_decay=args.weight_decay, clip=args.clip or None, same_batch=args.same_batch)
    if args.dtype not in (None, "float32"):
        why = "its second moments underflow" if args.dtype == "float16" else "AdamW's small updates are lost"
        raise UserError(f"train keeps its weights in float32: in {args.dtype} {why}")
    text = read_training_text(args.text)
    try:
        model = _load(args, err)
    except NoWeightsError:
        raise UserError(f"training needs a model's weights, and {args.model} has shapes only: give a GGUF file or "
                        f"a model folder with weights") from None
    _check_view(args, model.config)
    _check_capture_layers(capture, model.config)
    _check_training_fits(model, setup)
    with Progress(TextColumn("Training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=args.steps)
        trace = traced_training(model, text, setup, capture,
                                on_step=lambda step, result: bar.update(task, advance=1,
                                                                        description=f"loss {result.loss:.4f}"))
    if args.save:
        save_trace(trace, args.save, args.force)
        _say(err, f"saved the trace to {args.save}")
    _show(trace, args, out, err)
    return 0


def _check_training_fits(model: Model, setup: TrainingSetup) -> None:
    setup.check_fits(model.config.max_seq_len)
    need = training_bytes(model.config, setup.batch, setup.seq, model.weights.tied)
    free = free_bytes(model.device)
    if free is not None and need > free:
        raise UserError(f"a training step of --batch {setup.batch} × --seq {setup.seq} tokens needs about "
                        f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free: a smaller --batch or --seq")


def cmd_show(args, out: Console, err: Console) -> int:
    trace = load_trace(args.file)
    _check_outputs(args, training=trace.training is not None, inputs=(args.file,))
    _check_view(args, trace.config, trace.n_steps, trace.training is not None)
    trace.of_rank(args.rank)  # the rank exists
    if trace.ranks > 1:
        _check_rank_head(args, trace.config, trace.ranks)
    if not args.json:
        out.print(trace.answer, end="", markup=False, highlight=False)
    _show(trace, args, out, err)
    return 0


def cmd_diff(args, out: Console, err: Console) -> int:
    a, b = load_trace(args.a), load_trace(args.b)
    for trace in (a, b):
        _check_view(args, trace.config, trace.n_steps, trace.training is not None)
    # A tensor-parallel trace is compared as one rank saw it: its slices, partial sums and collectives' results.
    a, b = (t.of_rank(args.rank) if t.ranks > 1 else t for t in (a, b))
    out.print(diff_table(a, b, args.step, args.layer, args.stage, names=(args.a.name, args.b.name)))
    return 0


def cmd_diagram(args, out: Console, err: Console) -> int:
    if args.all is None and args.output is None:
        raise UserError("say where to draw: -o FILE (.svg, .png, .pdf or .dot), or --all FOLDER")
    if args.packing and PIPELINES[args.impl].packed_parts is None:
        raise UserError(f"--packing draws how an implementation packs its weights; --impl {args.impl} packs none "
                        f"(try --impl packed)")
    if args.packing and args.output is None:
        raise UserError("--packing draws one file: -o FILE")
    fmt = _output_format(args.output, args.force) if args.output else None
    targets = {}  # every file of --all, checked before the first is written
    if args.all is not None:
        if not args.all.is_dir():
            raise UserError(f"--all needs an existing folder, not {args.all}")
        for number in (None, *range(1, N_STAGES + 1)):
            name = "complete-model" if number is None else f"stage{number:02d}"
            targets[number] = [args.all / f"{name}.{fmt}" for fmt in ("dot", "svg")]
            for path in targets[number]:
                check_writable(path, args.force)
    trace = None
    if not args.symbolic:
        model = _load(args, err)
        _check_view(args, model.config)
        if model.tokenizer is None:
            raise UserError(f"{model.name} comes without a tokenizer: draw it with run --tokens N --shapes-only "
                            f"--diagram FILE")
        trace = traced_run(model, DEFAULT_PROMPT, max_new_tokens=1, pipeline=PIPELINES[args.impl])
    if args.packing:
        write_output(args.output, render(packing_diagram(PIPELINES[args.impl], trace), fmt), args.force)
        _say(err, f"drew {args.output}")
        return 0
    if args.output:
        graph = drawing(args.stage, trace, 0, args.layer, pipeline=PIPELINES[args.impl])
        write_output(args.output, render(graph, fmt), args.force)
        _say(err, f"drew {args.output}")
        return 0
    for number, paths in targets.items():
        graph = drawing(number, trace, 0, args.layer, pipeline=PIPELINES[args.impl])
        for path in paths:
            write_output(path, render(graph, path.suffix[1:]), args.force)
    _say(err, f"drew the complete model and the {N_STAGES} stages into {args.all}")
    return 0


def cmd_stages(args, out: Console, err: Console) -> int:
    pipeline = PIPELINES[args.impl]
    if args.json:
        print(json.dumps(stages_to_json(pipeline), indent=1))
    else:
        out.print(stages_table(pipeline))
    return 0
