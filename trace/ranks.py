"""`run --tp N`: N processes, one per rank, joined by torch.distributed.

The command started by the user is the launcher: it checks the arguments, starts the N ranks as
copies of itself with the environment that `torchrun` sets (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), watches them, and turns the first failure into one line after stopping the others.
A process started with that environment (by us, or by `torchrun` on one or many machines) is a
rank: it loads the model, keeps its slices of the weights (stages.tensor_parallel), runs the
stages, and sends its records to rank 0, which shows, saves and draws the whole trace.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from stages import UserError
from stages.tensor_parallel import Shard, set_shard

LAUNCHED_BY_US = "LLAMA_TRACE_LAUNCHER"  # set in the ranks we start: their errors go to the launcher
POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 3.0


def rank_environment() -> tuple[int, int] | None:
    """(rank, world size) when this process was started as a rank (by us or by torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be whole numbers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return rank, world


def speaks() -> bool:
    """Whether this process says its errors: under torchrun every rank would say the same, so rank 0
    speaks for all (the ranks we start write theirs for the launcher, which says the one that counts)."""
    return os.environ.get("RANK", "0") == "0" or LAUNCHED_BY_US in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(path: Path) -> str | None:
    """The one-line error a rank wrote ("error: ..."), if it ended with one."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines and lines[-1].startswith("error: ") else None


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _stop(processes: list[subprocess.Popen]) -> None:
    """Every rank still running is terminated, then killed if it does not go: no orphans are left."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
            p.send_signal(signal.SIGCONT)  # a stopped rank must run to end on SIGTERM
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stopped(p: subprocess.Popen) -> bool:
    """Whether a running rank is stopped (SIGSTOP, a debugger): it can answer no one."""
    try:
        return Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"
    except (OSError, IndexError):
        return False


def _failure(processes: list[subprocess.Popen], logs: list[Path]) -> tuple[str | None, int]:
    """What to say, and the exit status, when a rank ended badly: about the cause, not its consequences
    (a killed or stopped rank, before the ranks that lost it). Rank 0's own error is said as a single
    process would say it; a rank 0 that ended quietly (a closed pipe, Ctrl-C) ends the run as quietly."""
    world = len(processes)
    failed = [(rank, p.returncode) for rank, p in enumerate(processes) if p.returncode not in (None, 0)]
    killed = [(rank, code) for rank, code in failed if code < 0]
    stopped = [rank for rank, p in enumerate(processes) if p.returncode is None and _stopped(p)]
    if killed:
        rank, code = killed[0]
        return f"rank {rank} of {world} was killed ({_signal_name(code)}); the other ranks were stopped", 1
    if stopped:
        return (f"rank {stopped[0]} of {world} stopped answering (it is stopped, as by SIGSTOP): the others gave up "
                f"waiting; every rank was stopped"), 1
    rank, code = failed[0]
    said = _last_line(logs[rank])
    if said is None:
        return (None, code) if rank == 0 else (f"rank {rank} of {world} ended with status {code}", 1)
    return said, code


def _end_with_parent() -> None:
    """In a rank, before it runs: be terminated when the launcher dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(argv: list[str], world: int, err) -> int:
    """Start `world` ranks running `argv` (this command), wait for them, and return rank 0's exit status.
    Rank 0 writes to our standard output; each rank's standard error is kept, and rank 0's is passed on."""
    env_base = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()), LAUNCHED_BY_US: "1", "OMP_NUM_THREADS":
                os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))}
    with tempfile.TemporaryDirectory(prefix="llama-trace-ranks-") as folder:
        logs = [Path(folder) / f"rank{rank}.err" for rank in range(world)]
        processes: list[subprocess.Popen] = []
        failure: tuple[str | None, int] | None = None
        try:
            for rank in range(world):
                env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                with open(logs[rank], "wb") as log:
                    processes.append(subprocess.Popen(
                        [sys.executable, "-m", "llama_trace", *argv], env=env, stderr=log,
                        stdout=None if rank == 0 else subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                        preexec_fn=_end_with_parent))
            while None in [p.poll() for p in processes]:  # a list: every rank is asked, every time
                if any(p.returncode not in (None, 0) for p in processes):
                    failure = _failure(processes, logs)  # before the others are stopped
                    break
                time.sleep(POLL_SECONDS)
        finally:
            _stop(processes)
        if failure is None and any(p.returncode != 0 for p in processes):
            failure = _failure(processes, logs)
        if failure is None:
            sys.stderr.write(logs[0].read_text(errors="replace"))
            return 0
        message, status = failure
        if message is None:
            return status
        sys.stderr.write(f"error: {message}\n")
        return status


def join(world: int, device: torch.device, timeout: float) -> Shard:
    """This process as one rank of `world`: the default process group (gloo on the CPU, nccl on CUDA),
    whose collectives give up after `timeout` seconds without an answer."""
    rank, expected = rank_environment()
    if expected != world:
        raise UserError(f"--tp {world} was asked for, but this process was started as one of {expected} ranks "
                        f"(WORLD_SIZE={expected})")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise lost(rank, "could not join the other ranks", e) from None
    shard = Shard(rank, world)
    set_shard(shard)
    return shard


def lost(rank: int, what: str, error: Exception) -> UserError:
    """The one line of a rank that lost the others (torch.distributed's message, without its source file)."""
    reason = re.sub(r"^\[[^\]]*\] ", "", (str(error).strip().splitlines() or [type(error).__name__])[0])
    return UserError(f"rank {rank} of {os.environ.get('WORLD_SIZE', '?')} {what}: {reason}")


def leave() -> None:
    set_shard(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: int | None) -> int:
    """The sampling seed, the same on every rank (each draws the same token from the same logits)."""
    chosen = [seed if seed is not None else torch.seed() % 2**63]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def gather_trace(trace, shard: Shard):
    """Every rank's records, in rank order, in rank 0's trace (None on the other ranks)."""
    gathered = [None] * shard.world if shard.rank == 0 else None
    dist.gather_object(trace.records, gathered, dst=0)
    if shard.rank != 0:
        return None
    return replace(trace, records=[r for records in gathered for r in records], rank=None)
