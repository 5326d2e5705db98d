"""`python -m trace`: run a prompt through a LLaMA model and show its 19 stages."""
import argparse
import json

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from stages import DTYPES, Sampling, UserError, load_model
from stages.registry import STAGES

from .export import stages_to_json, trace_to_json
from .recorder import Capture
from .run import traced_run
from .tables import model_line, shapes_table, stage_detail, stages_table

EXAMPLES = """examples:
  python -m trace run "What is the capital of France?"            all 19 stages' shapes, prompt step, layer 0
  python -m trace run "What is the capital of France?" --stage 10  rotary embeddings in detail
  python -m trace run "Hi" --stage 13 --step 2 --layer 29          scores of the 2nd generated token, last layer
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
    model = run.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="a LLaMA-architecture GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default auto: CUDA when there is a GPU)")
    model.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                       help="the weights' and activations' dtype (default float32; softmax and logits "
                            "are always float32)")
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

    stages_cmd = commands.add_parser("stages", help="list the 19 stages")
    stages_cmd.error = parser.error
    stages_cmd.add_argument("--json", action="store_true", help="as JSON")
    return parser


def _load(args, err: Console):
    with Progress(TextColumn("Loading model"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("load", total=None)
        return load_model(args.model, args.device, args.dtype, progress=lambda done, total: bar.update(task, completed=done,
                                                                                            total=total))


def cmd_run(args, out: Console, err: Console) -> int:
    if not args.prompt.strip():
        raise UserError("the prompt is empty: give some text to start from")
    if args.step >= args.max_new_tokens:
        raise UserError(f"--step {args.step} does not exist: with --max-new-tokens {args.max_new_tokens} "
                        f"there are at most {args.max_new_tokens} steps (0-{args.max_new_tokens - 1})")
    model = _load(args, err)
    if args.layer >= model.config.n_layers:
        raise UserError(f"--layer {args.layer} does not exist: this model has layers 0-{model.config.n_layers - 1}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    chat = not args.raw and model.tokenizer.chat_template is not None
    if not args.raw and not chat:
        err.print("note: this model has no chat template, so the prompt is fed as it is", style="dim")
    stream = None if args.json else (lambda text: out.print(text, end="", markup=False, highlight=False))
    trace = traced_run(model, args.prompt, chat=chat, max_new_tokens=args.max_new_tokens,
                       sampling=sampling, capture=Capture(args.step, args.layer, everything=args.keep_all),
                       on_text=stream)
    if args.step >= trace.n_steps:
        raise UserError(f"--step {args.step} does not exist: generation stopped after {trace.n_steps} steps "
                        f"(0-{trace.n_steps - 1})")
    if args.json:
        print(json.dumps(trace_to_json(trace, args.step, args.layer, args.stage)))
        return 0
    out.print()
    out.print(f"[dim]{len(trace.new_ids)} new tokens from a {len(trace.prompt_ids)}-token prompt in "
              f"{trace.seconds:.2f} s[/dim]")
    out.print(f"[dim]{model_line(trace)}[/dim]")
    out.print()
    out.print(stage_detail(trace, args.stage, args.step, args.layer) if args.stage
              else shapes_table(trace, args.step, args.layer))
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
        return {"run": cmd_run, "stages": cmd_stages}[args.command](args, out, err)
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
