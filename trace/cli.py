"""`python -m trace`: run a prompt through a LLaMA model and show its 19 stages."""
import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from stages import DTYPES, Sampling, UserError, load_model
from stages.registry import STAGES

from .diagram import FORMATS, drawing, render
from .export import stages_to_json, trace_to_json
from .files import write_output
from .plots import PLOT_FORMATS, capture_for_plot, figure_bytes, stage_figure
from .recorder import Capture
from .run import traced_run
from .tables import model_line, shapes_table, stage_detail, stages_table

DEFAULT_PROMPT = "What is the capital of France?"
EXAMPLES = """examples:
  python -m trace run "What is the capital of France?"            all 19 stages' shapes, prompt step, layer 0
  python -m trace run "What is the capital of France?" --stage 10  rotary embeddings in detail
  python -m trace run "Hi" --stage 13 --step 2 --layer 29          scores of the 2nd generated token, last layer
  python -m trace run "Hi" --stage 13 --plot scores.png --head 4  attention heatmaps of head 4
  python -m trace diagram --stage 13 -o scores.svg                stage 13 drawn with graphviz
  python -m trace stages                                          the list of stages
"""


class Parser(argparse.ArgumentParser):
    """Errors in the arguments as one line, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _stage_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= len(STAGES):
        raise argparse.ArgumentTypeError(f"must be a stage number from 1 to {len(STAGES)}, not {text!r}")
    return int(text)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, not {text!r}")
        return value
    return parse


def _fraction(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a number from {low} to {high}, not {text!r}")
        return value
    return parse


def _add_model_options(command: argparse.ArgumentParser) -> None:
    model = command.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="a LLaMA-architecture GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default auto: CUDA when there is a GPU)")
    model.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                       help="the weights' and activations' dtype (default float32; softmax and logits "
                            "are always float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m trace", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Trace a real LLaMA-architecture model through the 19 stages of the\n"
                                "\"LLaMA Nuts and Bolts\" diagrams and show every tensor it computes.",
                    epilog=EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="generate from a prompt and show its stages",
                              description="Generate from PROMPT with the model, recording every stage; then\n"
                                          "show the shapes of all 19 stages, or one stage in detail.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    run.error = parser.error
    run.add_argument("prompt", help="the text to start from (wrapped in the chat template unless --raw)")
    show = run.add_argument_group("what to show")
    show.add_argument("--stage", type=_stage_number, metavar="N", help="show stage N (1-19) in detail")
    show.add_argument("--layer", type=_count(0), default=0, metavar="L", help="transformer block to show (default 0)")
    show.add_argument("--step", type=_count(0), default=0, metavar="S",
                      help="0 = the prompt step; k = the decode step that feeds generated token k (default 0)")
    show.add_argument("--keep-all", action="store_true",
                      help="keep the values of every step and layer, not just the shown one")
    show.add_argument("--json", action="store_true", help="print the same information as JSON on stdout")
    show.add_argument("--diagram", metavar="FILE", type=Path,
                      help="also draw the stage (or, without --stage, the complete model) with this run's "
                           "shapes to FILE (.svg, .png, .pdf or .dot)")
    show.add_argument("--plot", metavar="FILE", type=Path,
                      help="also save a matplotlib figure of the stage (needs --stage) to FILE (.png, .svg or .pdf)")
    show.add_argument("--head", type=_count(0), default=0, metavar="H",
                      help="the query head that --plot and the terminal heatmap show (default 0)")
    show.add_argument("--force", action="store_true", help="overwrite output files that exist already")
    _add_model_options(run)
    gen = run.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=_count(1), default=32, metavar="N",
                     help="at most N new tokens (default 32)")
    gen.add_argument("--temperature", type=_fraction(0.0, 100.0), default=0.0, metavar="T",
                     help="0 = greedy, the default; above 0 samples")
    gen.add_argument("--top-k", type=_count(0), default=0, metavar="K", help="sample among the K best tokens only")
    gen.add_argument("--top-p", type=_fraction(0.0, 1.0), default=1.0, metavar="P",
                     help="sample among the best tokens that make up mass P")
    gen.add_argument("--seed", type=_count(0), metavar="N", help="random seed for sampling")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as it is, without the chat template")

    diagram = commands.add_parser(
        "diagram", help="draw the stages with graphviz",
        description=f"Draw the complete model, or one stage, as in the \"LLaMA Nuts and Bolts\" diagrams,\n"
                    f"with the dtypes and shapes of a real run of {DEFAULT_PROMPT!r} (or symbolic shapes\n"
                    f"only, with --symbolic). For another prompt: run \"PROMPT\" --stage N --diagram FILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    diagram.error = parser.error
    diagram.add_argument("--stage", type=_stage_number, metavar="N", help="draw stage N (default: the complete model)")
    diagram.add_argument("-o", "--output", type=Path, metavar="FILE", help="the drawing (.svg, .png, .pdf or .dot)")
    diagram.add_argument("--all", type=Path, metavar="FOLDER",
                         help="draw the complete model and every stage into FOLDER, as .dot and .svg")
    diagram.add_argument("--layer", type=_count(0), default=0, metavar="L", help="the block to draw (default 0)")
    diagram.add_argument("--symbolic", action="store_true", help="symbolic shapes only; runs no model")
    diagram.add_argument("--force", action="store_true", help="overwrite files that exist already")
    _add_model_options(diagram)

    stages_cmd = commands.add_parser("stages", help="list the 19 stages")
    stages_cmd.error = parser.error
    stages_cmd.add_argument("--json", action="store_true", help="as JSON")
    return parser


def _load(args, err: Console):
    with Progress(TextColumn("Loading model"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("load", total=None)
        return load_model(args.model, args.device, args.dtype,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))


def _output_format(path: Path, force: bool, formats: tuple[str, ...] = FORMATS) -> str:
    """The file format a file name asks for; checked before any work is done."""
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise UserError(f"cannot tell the format of {path}: use a name ending in " +
                        ", ".join(f".{f}" for f in formats))
    if path.exists() and not force:
        raise UserError(f"{path} exists already (add --force to overwrite it)")
    return fmt


def _check_head(model, head: int) -> None:
    if head >= model.config.n_heads:
        raise UserError(f"--head {head} does not exist: this model has query heads 0-{model.config.n_heads - 1}")


def _capture(args) -> Capture:
    if args.keep_all:
        return Capture(everything=True)
    if args.plot:
        return capture_for_plot(args.stage, args.step, args.layer)
    return Capture(args.step, args.layer)


def _check_layer(model, layer: int) -> None:
    if layer >= model.config.n_layers:
        raise UserError(f"--layer {layer} does not exist: this model has layers 0-{model.config.n_layers - 1}")


def cmd_run(args, out: Console, err: Console) -> int:
    if not args.prompt.strip():
        raise UserError("the prompt is empty: give some text to start from")
    if args.step >= args.max_new_tokens:
        raise UserError(f"--step {args.step} does not exist: with --max-new-tokens {args.max_new_tokens} "
                        f"there are at most {args.max_new_tokens} steps (0-{args.max_new_tokens - 1})")
    diagram_format = _output_format(args.diagram, args.force) if args.diagram else None
    if args.plot and not args.stage:
        raise UserError("--plot needs --stage N: say which stage to plot")
    plot_format = _output_format(args.plot, args.force, PLOT_FORMATS) if args.plot else None
    model = _load(args, err)
    _check_layer(model, args.layer)
    _check_head(model, args.head)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    chat = not args.raw and model.tokenizer.chat_template is not None
    if not args.raw and not chat:
        err.print("note: this model has no chat template, so the prompt is fed as it is", style="dim")
    stream = None if args.json else (lambda text: out.print(text, end="", markup=False, highlight=False))
    trace = traced_run(model, args.prompt, chat=chat, max_new_tokens=args.max_new_tokens,
                       sampling=sampling, capture=_capture(args),
                       on_text=stream)
    if args.step >= trace.n_steps:
        raise UserError(f"--step {args.step} does not exist: generation stopped after {trace.n_steps} steps "
                        f"(0-{trace.n_steps - 1})")
    if args.diagram:
        graph = drawing(args.stage, trace, args.step, args.layer)
        write_output(args.diagram, render(graph, diagram_format), args.force)
        err.print(f"drew {args.diagram}", style="dim")
    if args.plot:
        figure = stage_figure(trace, args.stage, args.step, args.layer, args.head)
        write_output(args.plot, figure_bytes(figure, plot_format), args.force)
        err.print(f"plotted {args.plot}", style="dim")
    if args.json:
        print(json.dumps(trace_to_json(trace, args.step, args.layer, args.stage)))
        return 0
    out.print()
    out.print(f"[dim]{len(trace.new_ids)} new tokens from a {len(trace.prompt_ids)}-token prompt in "
              f"{trace.seconds:.2f} s[/dim]")
    out.print(f"[dim]{model_line(trace)}[/dim]")
    out.print()
    out.print(stage_detail(trace, args.stage, args.step, args.layer, args.head) if args.stage
              else shapes_table(trace, args.step, args.layer))
    return 0


def cmd_diagram(args, out: Console, err: Console) -> int:
    if args.all is None and args.output is None:
        raise UserError("say where to draw: -o FILE (.svg, .png, .pdf or .dot), or --all FOLDER")
    fmt = _output_format(args.output, args.force) if args.output else None
    trace = None
    if not args.symbolic:
        model = _load(args, err)
        _check_layer(model, args.layer)
        trace = traced_run(model, DEFAULT_PROMPT, max_new_tokens=1)
    if args.output:
        write_output(args.output, render(drawing(args.stage, trace, 0, args.layer), fmt), args.force)
        err.print(f"drew {args.output}", style="dim")
        return 0
    if not args.all.is_dir():
        raise UserError(f"--all needs an existing folder, not {args.all}")
    for number in (None, *range(1, len(STAGES) + 1)):
        graph = drawing(number, trace, 0, args.layer)
        name = "complete-model" if number is None else f"stage{number:02d}"
        for fmt in ("dot", "svg"):
            write_output(args.all / f"{name}.{fmt}", render(graph, fmt), args.force)
    err.print(f"drew the complete model and the {len(STAGES)} stages into {args.all}", style="dim")
    return 0


def cmd_stages(args, out: Console, err: Console) -> int:
    if args.json:
        print(json.dumps(stages_to_json(), indent=1))
    else:
        out.print(stages_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    try:
        return {"run": cmd_run, "diagram": cmd_diagram, "stages": cmd_stages}[args.command](args, out, err)
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
