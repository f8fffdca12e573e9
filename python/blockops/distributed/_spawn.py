"""Run a function on ``world`` local gloo ranks (spawned processes) with a deadline: what the tests and the CPU bench
use. A rank that raises fails the run at once (the others are terminated, not left waiting on it); a run past the
deadline is killed. Results come back through pickle files, one per rank."""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback


_FAILURE_GRACE_S = 5.0   # after a rank fails, how long the others get to exit (and write their tracebacks)


class SpawnError(RuntimeError):
    """A rank failed or the run passed its deadline; the message holds the failing rank's traceback."""


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args, threads: int, dist_timeout: float):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=dist_timeout))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        with open(path + ".tmp", "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:          # reported to the parent, then a non-zero exit
        with open(path + ".tmp", "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        os.replace(path + ".tmp", path)
        raise SystemExit(1)
    os.replace(path + ".tmp", path)


def spawn(fn, world: int, *args, timeout: float = 120.0, threads: int = 1, dist_timeout: float = 60.0) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in its own process of a gloo group.

    ``fn`` must be importable (a module-level function). Each rank runs with ``threads`` torch threads and a
    ``dist_timeout`` on every collective; the whole run must finish within ``timeout`` seconds. Raises
    :class:`SpawnError` with the tracebacks of the ranks that failed (after a short grace for the others to exit,
    since the rank that raised first is not always the first to exit: its peers' collectives fail as soon as its
    process group closes), or on the deadline.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="blockops_spawn_") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, tmp, fn, args, threads, dist_timeout),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.exitcode for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    grace = time.monotonic() + _FAILURE_GRACE_S
                    while any(p.exitcode is None for p in procs) and time.monotonic() < grace:
                        time.sleep(0.05)
                    codes = [p.exitcode for p in procs]
                    raise SpawnError("\n".join(f"rank {r} of {world} failed (exit code {c}):\n{_read(tmp, r)}"
                                                for r, c in enumerate(codes) if c not in (None, 0)))
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise SpawnError(f"ranks {[r for r, c in enumerate(codes) if c is None]} of {world} still "
                                     f"running after {timeout} s (deadlock?)")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        results = []
        for r in range(world):
            status, value = _load(tmp, r)
            if status != "ok":
                raise SpawnError(f"rank {r} of {world} failed:\n{value}")
            results.append(value)
        return results


def _load(tmp: str, rank: int):
    path = os.path.join(tmp, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return "error", "(no result written)"
    with open(path, "rb") as f:
        return pickle.load(f)


def _read(tmp: str, rank: int) -> str:
    status, value = _load(tmp, rank)
    return value if status == "error" else "(no traceback)"
