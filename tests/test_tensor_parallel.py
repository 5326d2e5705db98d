"""`run --tp N`: real processes joined by torch.distributed (gloo on the CPU), compared with one process."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.tensor_parallel import SPLIT_DIM
from trace.recorder import Capture
from trace.run import traced_run
from trace.tracefile import load_trace
from trace.verify import tiny_pair

from .test_cli import QUESTION, ROOT, WIDTH, cli

PROMPT = "the cat sat"
# Tensors every rank holds whole after a collective (or before any), equal to the single-process run's.
WHOLE = [(4, "x"), (7, "attention output"), (14, "attention output"), (15, "h"), (17, "ffn output"),
         (18, "out"), (19, "logits"), (19, "probs")]
# Tensors of the rank's own heads or FFN columns, and the axis the rank's slice lies on.
SLICED = [(8, "xq", 1), (8, "xk", 1), (8, "xv", 1), (10, "xq (rotated)", 1), (11, "cache_k", 1),
          (13, "scores (softmax)", 0), (14, "heads merged", 1), (17, "gate * up", 1)]
SIZES = {2: dict(n_heads=4, n_kv_heads=2), 3: dict(n_heads=6, n_kv_heads=3, dim=96, ffn_dim=192)}


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def runs(request, tmp_path_factory):
    """(N, the GGUF, the single-process trace, the N-rank trace read back from its file)."""
    world = request.param
    folder = tmp_path_factory.mktemp(f"tp{world}")
    model, _ = tiny_pair(folder / "tiny.gguf", **SIZES[world])
    single = traced_run(model, PROMPT, chat=False, max_new_tokens=4, capture=Capture.everything())
    result = cli("run", PROMPT, "--raw", "--model", str(folder / "tiny.gguf"), "--tp", str(world),
                 "--capture", "all", "--max-new-tokens", "4", "--save", str(folder / "tp.trace"))
    assert result.returncode == 0, result.stderr
    return world, folder, single, load_trace(folder / "tp.trace")


def test_same_tokens_and_every_whole_tensor_as_one_process(runs):
    world, _, single, tp = runs
    assert tp.ranks == world and tp.new_ids == single.new_ids
    for rank in range(world):
        view = tp.of_rank(rank)
        for step in range(single.n_steps):
            for layer in range(single.config.n_layers):
                for stage, name in WHOLE:
                    torch.testing.assert_close(view.values(stage, name, step, layer),
                                               single.values(stage, name, step, layer), rtol=1e-5, atol=1e-5)


def test_partial_sums_add_up_to_the_all_reduced_tensor(runs):
    world, _, single, tp = runs
    for stage, name in ((4, "x"), (14, "attention output"), (17, "ffn output")):
        for step in range(tp.n_steps):
            partials = [tp.of_rank(r).values(stage, f"{name} (partial)", step, 1) for r in range(world)]
            if stage == 4:  # each token's row is looked up by the one rank that holds its id, zeros elsewhere
                assert [sum(bool(p[row].any()) for p in partials) for row in range(len(partials[0]))] == \
                    [1] * len(partials[0])
            else:  # each rank adds its own heads' (or hidden units') part
                assert not torch.allclose(partials[0], partials[1])
            torch.testing.assert_close(sum(partials), single.values(stage, name, step, 1), rtol=1e-5, atol=1e-5)


def test_each_rank_holds_its_slice(runs):
    world, _, single, tp = runs
    c = single.config
    for rank in range(world):
        view = tp.of_rank(rank)
        for stage, name, axis in SLICED:
            whole = single.values(stage, name, 1, 0)
            width = whole.shape[axis] // world
            torch.testing.assert_close(view.values(stage, name, 1, 0),
                                       whole.narrow(axis, rank * width, width), rtol=1e-5, atol=1e-5)
        for stage, name in ((8, "wq"), (8, "wk"), (14, "wo"), (17, "w1"), (17, "w2"), (4, "tok_embeddings"),
                            (19, "output")):
            full = single.record(stage, name, 0, 0).shape
            split = list(full)
            split[SPLIT_DIM[name]] //= world
            assert view.record(stage, name, 0, 0).shape == tuple(split)
        assert view.record(19, "logits (slice)").shape == (c.vocab_size // world,)


def test_the_trace_file_shows_and_diffs_like_any_other(runs):
    world, folder, single, tp = runs
    shown = cli("show", str(folder / "tp.trace"), "--stage", "14", "--rank", str(world - 1))
    assert shown.returncode == 0, shown.stderr
    assert f"rank {world - 1} of {world}" in shown.stdout and "attention output (partial)" in shown.stdout
    assert all(len(line) <= WIDTH for line in shown.stdout.splitlines())
    assert "query heads 0-1 are the model's" in shown.stdout
    diffed = cli("diff", str(folder / "tp.trace"), str(folder / "tp.trace"))
    assert diffed.returncode == 0, diffed.stderr
    for stage in (12, 13, 17):  # the figures of one rank, with its own heads numbered from 0
        plotted = cli("show", str(folder / "tp.trace"), "--stage", str(stage), "--rank", "1", "--head", "1",
                      "--plot", str(folder / f"rank1-{stage}.png"), "--force")
        assert plotted.returncode == 0 and (folder / f"rank1-{stage}.png").stat().st_size > 10_000, plotted.stderr
    too_far = cli("show", str(folder / "tp.trace"), "--stage", "13", "--head", "2")  # both models: 2 heads a rank
    assert too_far.returncode == 1 and "rank 0 holds 2 query heads, numbered 0-1" in too_far.stderr
    wrong = cli("show", str(folder / "tp.trace"), "--rank", str(world))
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and f"had {world} ranks" in wrong.stderr
    assert wrong.stdout == ""  # said before anything is shown


@pytest.mark.parametrize("args, message", [
    (["--tp", "2"], "9 query heads H do not split evenly over 2 ranks (it splits over 1, 3"),
    (["--tp", "3", "--impl", "packed"], "does not combine with --impl packed"),
    (["--tp", "3", "--shapes-only"], "does not combine with --shapes-only"),
    (["--tp", "3", "--rank", "3"], "with --tp 3 the ranks are 0-2"),
    (["--tp", "3", "--head", "3"], "rank 0 holds 3 query heads, numbered 0-2"),
    (["--rank", "1"], "add --tp N"),
    (["--tp", "2", "--model", "llama-3.1-8b"], "the preset llama-3.1-8b has none"),
])
def test_what_does_not_split_is_one_line(args, message):
    result = cli("run", "hi", *args)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def _rank_of(pid: str) -> int | None:
    """A child's RANK, or None while it has none: one just forked still has the launcher's environment,
    and a short-lived child (not a rank) may be gone before its environment is read."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    except (ProcessLookupError, FileNotFoundError):
        return None
    return next((int(v[5:]) for v in environ if v.startswith("RANK=")), None)


def _ranks_of(launcher: subprocess.Popen, world: int, seconds: float = 60) -> list[int]:
    """The pids of the ranks a launcher started (its child processes), in rank order, once all run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        rank = {pid: _rank_of(pid) for pid in children}
        if len(children) == world and None not in rank.values():
            return sorted(map(int, children), key=lambda pid: rank[str(pid)])
        time.sleep(0.05)
    raise AssertionError("the ranks did not start")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc (Linux)")
@pytest.mark.parametrize("how, message", [
    (signal.SIGKILL, "rank 1 of 2 was killed (SIGKILL); the other ranks were stopped"),
    (signal.SIGSTOP, "rank 1 of 2 stopped answering"),  # a rank that hangs: the others give up after --timeout
])
def test_a_rank_that_dies_or_hangs_ends_the_run_in_one_line(runs, how, message):
    world, folder, _, _ = runs
    if world != 2:
        pytest.skip("one world size is enough")
    launcher = subprocess.Popen([sys.executable, "-m", "trace", "run", PROMPT, "--raw", "--model",
                                 str(folder / "tiny.gguf"), "--tp", "2", "--timeout", "5"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = _ranks_of(launcher, 2)
    os.kill(ranks[1], how)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 1 and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert all(_gone(pid) for pid in ranks)  # no orphans


def test_the_drawing_has_a_lane_per_rank_and_each_collective_once(runs):
    world, folder, _, _ = runs
    for stage, collective in ((14, "all-reduce"), (19, "all-gather")):
        drawn = folder / f"stage{stage}.svg"
        result = cli("show", str(folder / "tp.trace"), "--stage", str(stage), "--diagram", str(drawn), "--force")
        assert result.returncode == 0, result.stderr
        svg = drawn.read_text()
        lanes = re.findall(r">rank (\d+)( \(shown in the tables\))?<", svg)
        assert lanes == [(str(rank), " (shown in the tables)" if rank == 0 else "") for rank in range(world)]
        assert svg.count(f">{collective.replace('-', '&#45;')}:") == 1
    same = folder / "stage6.dot"
    assert cli("show", str(folder / "tp.trace"), "--stage", "6", "--diagram", str(same), "--force").returncode == 0
    assert f"the same on each of the {world} ranks" in same.read_text() and 'label="rank 0"' not in same.read_text()


def test_the_embedded_model_on_three_ranks_answers_as_on_one(embedded_model, tmp_path):
    """Real weights (H = 9, Hkv = 3: three ranks of 3 query heads and one KV head each)."""
    single = traced_run(embedded_model, QUESTION, max_new_tokens=8)
    result = cli("run", QUESTION, "--tp", "3", "--max-new-tokens", "8", "--save", str(tmp_path / "tp.trace"),
                 "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    split = shown["tensor_parallel"]
    assert (split["ranks"], split["rank"], split["query_heads"], split["kv_heads"]) == (3, 0, [0, 2], [0, 0])
    assert split["weights"]["wo"] == {"dim": 1, "from": 0, "to": 191} and shown["text"] == single.text
    tp = load_trace(tmp_path / "tp.trace")
    assert tp.new_ids == single.new_ids and tp.answer == "The capital of France is Paris."
    for rank in range(3):
        torch.testing.assert_close(tp.of_rank(rank).values(19, "logits"), single.values(19, "logits"),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tp.of_rank(rank).values(18, "out"), single.values(18, "out"),
                                   rtol=1e-4, atol=1e-4)


def test_under_torchrun_each_process_is_one_rank(runs):
    """torchrun starts the processes (as it would on several machines); the command starts none of its own."""
    world, folder, _, tp = runs
    if world != 2:
        pytest.skip("one world size is enough")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "llama_trace", "run", PROMPT, "--raw", "--model", str(folder / "tiny.gguf"),
                             "--tp", "2", "--capture", "all", "--max-new-tokens", "4", "--save",
                             str(folder / "torchrun.trace"), "--force"],
                            cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("tensor parallel: rank 0 of 2") == 1  # rank 1 says nothing
    started = load_trace(folder / "torchrun.trace")
    assert started.ranks == 2 and started.new_ids == tp.new_ids
    for rank in range(2):
        torch.testing.assert_close(started.of_rank(rank).values(19, "logits", 1), tp.of_rank(rank).values(19, "logits", 1))
