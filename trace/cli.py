"""`python -m trace`: the command line. Arguments are parsed here; commands.py does the work."""
import argparse
import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from stages import DTYPES, PRESETS, UserError
from stages.pipelines import IMPLEMENTATIONS, N_STAGES
from stages.tensor_parallel import MAX_RANKS
from stages.training import LAYER_WEIGHTS

from . import commands, ranks

from .commands import DEFAULT_PROMPT

EXAMPLES = """examples:
  python -m trace run "What is the capital of France?"
      all 19 stages' shapes, prompt step, layer 0
  python -m trace run "What is the capital of France?" --stage 10
      rotary embeddings in detail
  python -m trace run "Hi" --stage 13 --step 2 --layer 29
      scores of the 2nd generated token, last layer
  python -m trace run "Hi" --stage 13 --plot scores.png --head 4
      attention heatmaps of head 4
  python -m trace run "Hi" --save hi.trace
      keep the whole run in a file
  python -m trace run "Hi" --model ./Llama-3.2-1B-Instruct
      a Hugging Face folder (or GGUF, or Meta's)
  python -m trace run "Hi" --model llama-3.1-8b --shapes-only
      Llama 3.1 8B's shapes, without its weights
  python -m trace run "Hi" --impl packed --stage 8 --save p.trace
      as a serving engine runs it: packed qkv_proj
  python -m trace diff plain.trace p.trace
      the two implementations, stage by stage
  python -m trace run "Hi" --tp 3 --stage 14 --rank 1
      split over 3 processes: rank 1's heads
  python -m trace show hi.trace --stage 13
      look at it later, without the model
  python -m trace diagram --stage 13 -o scores.svg
      stage 13 drawn with graphviz
  python -m trace stages
      the list of stages
  python -m trace train --steps 4 --stage 17
      4 traced steps of AdamW: gradients, updates
"""

TRAIN_EXAMPLES = """examples:
  python -m trace train
      4 steps on the text that ships with the project
  python -m trace train notes.txt --batch 4 --seq 32
      your text, batches of 4 rows of 32 tokens
  python -m trace train --stage 13 --layer 3
      the scores of layer 3 and their gradient
  python -m trace train --plot learning.png
      loss curve, gradient norms, wq's update
  python -m trace train --stage 17 --plot ffn.png
      the FFN's gate*up beside its gradient
  python -m trace train --steps 8 --save steps.trace
      keep it; then: show steps.trace --stage 19
"""


class Parser(argparse.ArgumentParser):
    """Errors in the arguments as one line, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _stage_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= N_STAGES:
        raise argparse.ArgumentTypeError(f"must be a stage number from 1 to {N_STAGES}, not {text!r}")
    return int(text)


def _count(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) < 100 else None
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            within = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be a whole number {within}, not {text!r}")
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


def _add_model_options(command: argparse.ArgumentParser, inference: bool = True) -> argparse._ArgumentGroup:
    """--model, --device and --dtype; for inference also --shapes-only and --impl."""
    model = command.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="a GGUF file, a Hugging Face model folder (config.json, *.safetensors, "
                            "tokenizer.json), a Meta folder (params.json, consolidated.*.pth, tokenizer.model)" +
                            (", or, with --shapes-only, a config.json / params.json alone or a preset: "
                             f"{', '.join(PRESETS)}" if inference else "") +
                            " (default: the embedded SmolLM2-135M-Instruct)")
    if inference:
        model.add_argument("--shapes-only", action="store_true",
                           help="read no weights: run the stages on torch's meta device, which computes every "
                                "tensor's shape and dtype and no number (any model size; e.g. --model llama-3.1-8b)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default auto: CUDA when there is a GPU)")
    model.add_argument("--dtype", choices=tuple(DTYPES),
                       help="the weights' and activations' dtype (default float32, bfloat16 for the presets; "
                            "softmax and logits are always float32)" if inference else
                            "training runs in float32 only (the default): AdamW's updates vanish in the others")
    if inference:
        _add_impl_option(model)
    return model


def _add_impl_option(group) -> None:
    group.add_argument("--impl", choices=IMPLEMENTATIONS, default="plain",
                       help="how the model is run: 'plain', the stages as Meta's reference code runs them (the "
                            "default), or 'packed', as a serving engine (vLLM) runs the same model: one qkv_proj "
                            "and one gate_up_proj matmul, each residual add fused into the next RMSNorm, "
                            "rotate-half RoPE")


STEP_HELP = "0 = the prompt step; k = the decode step that feeds generated token k (default 0)"
PLOT_HELP = "also save a matplotlib figure of the stage (needs --stage) to FILE (.png, .svg or .pdf)"


def _add_view_options(command: argparse.ArgumentParser, step_help: str = STEP_HELP, plot_help: str = PLOT_HELP,
                      ranks: bool = True) -> argparse._ArgumentGroup:
    show = command.add_argument_group("what to show")
    show.add_argument("--stage", type=_stage_number, metavar="N", help="show stage N (1-19) in detail")
    show.add_argument("--layer", type=_count(0), default=0, metavar="L", help="transformer block to show (default 0)")
    show.add_argument("--step", type=_count(0), default=0, metavar="S", help=step_help)
    if ranks:
        show.add_argument("--rank", type=_count(0, MAX_RANKS - 1), default=0, metavar="R",
                          help="of a tensor-parallel run (--tp N): the rank whose slices and partial sums to show "
                               "(default 0)")
    show.add_argument("--json", action="store_true", help="print the same information as JSON on stdout")
    show.add_argument("--diagram", metavar="FILE", type=Path,
                      help="also draw the stage (or, without --stage, the complete model) with this run's "
                           "shapes to FILE (.svg, .png, .pdf or .dot)")
    show.add_argument("--plot", metavar="FILE", type=Path, help=plot_help)
    show.add_argument("--head", type=_count(0), default=0, metavar="H",
                      help="the query head that --plot and the terminal heatmap show (default 0" +
                           ("; with --tp, one of the shown rank's own heads, numbered from 0)" if ranks else ")"))
    show.add_argument("--force", action="store_true", help="overwrite output files that exist already")
    return show


def _add_weight_option(group, of_training: str = "") -> None:
    names = [name for _, name in LAYER_WEIGHTS]
    group.add_argument("--weight", choices=names, default="wq", metavar="NAME",
                       help=f"{of_training}the weight whose update --plot shows, of --layer: "
                            f"{', '.join(names)} (default wq)")


def _add_capture_options(command: argparse.ArgumentParser, budget_note: str = "") -> argparse._ArgumentGroup:
    capture = command.add_argument_group("what the trace keeps")
    capture.add_argument("--capture", default="selected", metavar="POLICY",
                         help="which tensors keep their values (all keep statistics): 'selected' (the shown "
                              "step and layer, the default), 'all', or rules like 'stages=13,17 layers=0-3 "
                              "steps=0' (several separated by ';'), kept on top of the shown step and layer")
    capture.add_argument("--max-trace-mb", type=_count(1), default=1024, metavar="MB",
                         help=f"stop keeping values beyond this many MB, and say so (default 1024{budget_note})")
    capture.add_argument("--store-dtype", choices=("float16", "bfloat16"),
                         help="keep floating-point values in this smaller dtype (statistics stay exact)")
    capture.add_argument("--save", type=Path, metavar="FILE",
                         help="save the whole trace to FILE (safetensors with a JSON manifest)")
    return capture


def _command(subcommands, name: str, summary: str, description: str,
             **kw) -> argparse.ArgumentParser:
    """A sub-command (a Parser: its argument errors are one line, which points to its own --help)."""
    return subcommands.add_parser(name, help=summary, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m trace", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Trace a real LLaMA-architecture model through the 19 stages of the\n"
                                "\"LLaMA Nuts and Bolts\" diagrams and show every tensor it computes.",
                    epilog=EXAMPLES)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    run = _command(subcommands, "run", "generate from a prompt and show its stages",
                   "Generate from PROMPT with the model, recording every stage; then\n"
                   "show the shapes of all 19 stages, or one stage in detail.", epilog=EXAMPLES)
    run.add_argument("prompt", nargs="?", help="the text to start from (wrapped in the chat template unless --raw)")
    _add_view_options(run)
    capture = _add_capture_options(run, "; with --tp, on each rank")
    capture.add_argument("--estimate", action="store_true",
                         help="only say how much memory the capture policy will take, then stop")
    model = _add_model_options(run)
    model.add_argument("--tokens", type=_count(1, 1 << 20), metavar="N",
                        help="with --shapes-only: N placeholder tokens stand in for the prompt (where the "
                             "model has no tokenizer)")
    parallel = run.add_argument_group("tensor parallelism")
    parallel.add_argument("--tp", type=_count(1, MAX_RANKS), default=1, metavar="N",
                          help="split the model over N processes as Meta's model.py does (torch.distributed: "
                               "gloo on the CPU, nccl on CUDA), each holding a slice of every large weight; the "
                               "trace holds every rank's records (default 1). Also runs under torchrun")
    parallel.add_argument("--timeout", type=_count(1, 24 * 3600), default=60, metavar="SECONDS",
                          help="with --tp: how long a rank waits for the others before the run is stopped "
                               "(default 60)")
    gen = run.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=_count(1), default=32, metavar="N",
                     help="at most N new tokens (default 32)")
    gen.add_argument("--temperature", type=_fraction(0.0, 100.0), default=0.0, metavar="T",
                     help="0 = greedy, the default; above 0 samples")
    gen.add_argument("--top-k", type=_count(0), default=0, metavar="K", help="sample among the K best tokens only")
    gen.add_argument("--top-p", type=_fraction(0.0, 1.0), default=1.0, metavar="P",
                     help="sample among the best tokens that make up mass P")
    gen.add_argument("--seed", type=_count(0, 2**64 - 1), metavar="N", help="random seed for sampling")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as it is, without the chat template")
    gen.add_argument("--system", metavar="TEXT",
                     help="the system prompt, where the model's chat format has one (e.g. \"You are Einstein\")")

    diagram = _command(
        subcommands, "diagram", "draw the stages with graphviz",
        f"Draw the complete model, or one stage, as in the \"LLaMA Nuts and Bolts\"\n"
        f"diagrams, with the dtypes and shapes of a real run of\n"
        f"{DEFAULT_PROMPT!r} (or symbolic shapes only, with --symbolic).\n"
        f"For another prompt: run \"PROMPT\" --stage N --diagram FILE.")
    diagram.add_argument("--stage", type=_stage_number, metavar="N", help="draw stage N (default: the complete model)")
    diagram.add_argument("-o", "--output", type=Path, metavar="FILE", help="the drawing (.svg, .png, .pdf or .dot)")
    diagram.add_argument("--all", type=Path, metavar="FOLDER",
                         help="draw the complete model and every stage into FOLDER, as .dot and .svg")
    diagram.add_argument("--layer", type=_count(0), default=0, metavar="L", help="the block to draw (default 0)")
    diagram.add_argument("--symbolic", action="store_true", help="symbolic shapes only; runs no model")
    diagram.add_argument("--packing", action="store_true",
                         help="draw how --impl packed makes its packed weights from the checkpoint's tensors")
    diagram.add_argument("--force", action="store_true", help="overwrite files that exist already")
    _add_model_options(diagram)

    show = _command(subcommands, "show", "show a saved trace, as run or train showed it",
                    "Show a trace saved with run --save or train --save, exactly as it was shown\n"
                    "when it ran, without the model.")
    show.add_argument("file", type=Path, help="a trace file")
    _add_weight_option(_add_view_options(show, step_help=STEP_HELP[:-len(" (default 0)")] + "; of a training "
                                         "trace, the training step (default 0)",
                                         plot_help=PLOT_HELP.replace("(needs --stage)", "(needs --stage, "
                                                                     "except of a training trace)")),
                       "of a training trace: ")

    diff = _command(subcommands, "diff", "compare two saved traces stage by stage",
                    "Compare two saved traces stage by stage: shapes, dtypes, and the\n"
                    "largest difference of the values where both kept them.")
    diff.add_argument("a", type=Path, help="a trace file")
    diff.add_argument("b", type=Path, help="another trace file")
    diff.add_argument("--stage", type=_stage_number, metavar="N", help="only stage N")
    diff.add_argument("--layer", type=_count(0), default=0, metavar="L", help="the block to compare (default 0)")
    diff.add_argument("--step", type=_count(0), default=0, metavar="S", help="the step to compare (default 0)")
    diff.add_argument("--rank", type=_count(0, MAX_RANKS - 1), default=0, metavar="R",
                      help="of a tensor-parallel trace (run --tp N): the rank to compare (default 0)")

    train = _command(subcommands, "train", "trace training steps: the loss, gradients and AdamW",
                     "Train the model for a few steps on a text and record every stage of each\n"
                     "step: the batch cut from the text, the forward pass with its batch dimension\n"
                     "(no KV cache), the loss, the gradient of every tensor and weight, and AdamW's\n"
                     "update of every weight. The weights change in memory only, never on disk.",
                     epilog=TRAIN_EXAMPLES)
    train.add_argument("text", nargs="?", type=Path, metavar="TEXT_FILE",
                       help="a UTF-8 text to learn from (default: a short text that ships with the project)")
    _add_weight_option(_add_view_options(
        train, step_help="the training step to show (default 0)", ranks=False,
        plot_help="also save a figure to FILE (.png, .svg or .pdf): the loss over the steps, the gradient norms by "
                  "layer and stage, and --weight's update; with --stage, the stage's tensor beside its gradient"))
    learning = train.add_argument_group("training")
    learning.add_argument("--batch", type=_count(1, 1024), default=2, metavar="B", help="sequences per step (default 2)")
    learning.add_argument("--seq", type=_count(1, 1 << 16), default=64, metavar="T",
                          help="tokens per sequence (default 64)")
    learning.add_argument("--steps", type=_count(1, 10000), default=4, metavar="N", help="training steps (default 4)")
    learning.add_argument("--lr", type=_fraction(1e-12, 10.0), default=1e-4, metavar="LR",
                          help="AdamW's learning rate (default 1e-4)")
    learning.add_argument("--weight-decay", type=_fraction(0.0, 10.0), default=0.01, metavar="WD",
                          help="AdamW's weight decay (default 0.01)")
    learning.add_argument("--clip", type=_fraction(0.0, 1e6), default=1.0, metavar="NORM",
                          help="clip the gradients' total norm to NORM; 0: no clipping (default 1.0)")
    learning.add_argument("--same-batch", action="store_true",
                          help="train every step on the first batch: the loss falls as the model learns it by heart")
    _add_capture_options(train)
    _add_model_options(train, inference=False)
    train.set_defaults(shapes_only=False, impl="plain", rank=0)

    stages_cmd = _command(subcommands, "stages", "list the 19 stages",
                          "The 19 stages of the diagrams, and the letters their shapes use.")
    stages_cmd.add_argument("--json", action="store_true", help="as JSON")
    _add_impl_option(stages_cmd)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that every `finally` runs (no partial file is left)."""


def _stop_on_sigterm(signum, frame):
    raise Stopped()


def _text_arguments_are_text(argv: list[str]) -> None:
    """Arguments that are not valid UTF-8 arrive with lone surrogates: say so before any work."""
    for value in argv:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"an argument is not valid UTF-8 text: {value.encode('utf-8', 'replace').decode()!r}") \
                from None


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether torch failed to allocate (torch.OutOfMemoryError on CUDA, a plain RuntimeError on the CPU)."""
    text = str(e)
    return (type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
            or "not enough memory" in text)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        raise BrokenPipeError  # (rich exits with status 1 here; main ends with 141, as command-line tools do)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show '·' gets '?', not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # what the ranks of --tp N are started with
    out, err = _Console(), _Console(stderr=True)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        _text_arguments_are_text(sys.argv[1:] if argv is None else argv)
        status = getattr(commands, f"cmd_{args.command}")(args, out, err)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except UserError as e:
        if ranks.speaks():
            err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Stopped:
        err.print("terminated")
        return 143
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's allocators say it as a RuntimeError
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        smaller = ("a smaller --batch or --seq" if args.command == "train"
                   else "a shorter prompt, fewer new tokens")
        err.print(f"error: out of memory (try {smaller} or a smaller --capture)", markup=False)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_as_command() -> NoReturn:
    """`main` as the process's whole life (`python -m trace`, `llama-trace`): it then ends at once.
    Python's teardown of torch takes half a second after the work is done (measured: `import torch`
    alone exits 0.6 s later than `os._exit`), time a user waits for the prompt. Whatever a program
    asked to be done at exit still is (atexit, so temporary folders go too); files are closed by then.
    Threads of Python's own left running (none of ours) get the ordinary exit, which waits for them."""
    status = main()
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)  # (not in every Python: then the usual way)
    if run_exit_functions is None or threading.active_count() > 1:
        sys.exit(status)
    run_exit_functions()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # (the reader left after main's own flush: nothing more to tell it)
        pass
    os._exit(status)
