"""Benchmarks of every kernel family (used by `python -m blockops bench` and the scripts in bench/).

Each family module has `run(device, quick=True) -> list[Result]` and `OPS`, the torch.ops.blockops ops its rows run
(backward kernels included); FAMILIES lists the runs in suite order, FAMILY_OPS the ops. Every row carries its
measured error and tolerance (see blockops.bench.harness); `report_failures` prints the rows that exceed theirs.
`run_suite(..., smoke=True)` runs the quick configurations with one timed call per timing and no warm-up, every error
check kept: with the kernel counters (`blockops.kernel_call_counts()`), the cheap check that every op's kernel runs
in some row (tests/test_bench_cli.py).
"""
from __future__ import annotations

import contextlib
import sys

from blockops.bench import (attention, bitpack, block_cache, context_parallel, dllm, lowbit, path_attention, ptq161,
                            vq)
from blockops.bench.harness import (Result, device_isa, failures, format_table, machine_description, plot,
                                    read_bandwidth_gbps, report_failures, smoke_timing, title, write_json)

FAMILIES = {
    "bitpack": bitpack.run,
    "lowbit": lowbit.run,
    "attention": attention.run,
    "path_attention": path_attention.run,
    "vq": vq.run,
    "ptq161": ptq161.run,
    "dllm": dllm.run,
    "block_cache": block_cache.run,
    "context_parallel": context_parallel.run,
}
# Family -> the torch.ops.blockops ops its rows run (each module's OPS; blockops.build_info()["ops"] maps every op
# to its family).
FAMILY_OPS = {
    "bitpack": bitpack.OPS,
    "lowbit": lowbit.OPS,
    "attention": attention.OPS,
    "path_attention": path_attention.OPS,
    "vq": vq.OPS,
    "ptq161": ptq161.OPS,
    "dllm": dllm.OPS,
    "block_cache": block_cache.OPS,
    "context_parallel": context_parallel.OPS,
}
# Deprecated family names -> the current ones.
ALIASES = {"path": "path_attention"}


def resolve_families(names, file=None) -> list[str]:
    """Family names with deprecated aliases mapped to the current names (a one-line note on stderr for each);
    all families for None. Raises ValueError for an unknown name."""
    if not names:
        return list(FAMILIES)
    resolved = []
    for name in names:
        if name in ALIASES:
            print(f"note: benchmark family {name!r} is now {ALIASES[name]!r}; the old name is deprecated",
                  file=sys.stderr if file is None else file)
            name = ALIASES[name]
        if name not in FAMILIES:
            raise ValueError(f"unknown benchmark family {name!r}; known: {list(FAMILIES)}")
        if name not in resolved:
            resolved.append(name)
    return resolved


def family_main(name: str) -> None:
    """Command line of a bench/bench_<family>.py script: every shape of one family, table and JSON; exits 1 when a
    row's error exceeds its tolerance (naming the rows on stderr)."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=f"blockops {name} benchmark, all shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=f"bench_results/{name}.json")
    args = parser.parse_args()
    results = FAMILIES[name](args.device, quick=False)
    bandwidth = read_bandwidth_gbps(args.device)
    write_json(results, args.json, args.device, bandwidth)
    print(title(args.device, bandwidth))
    print(format_table(results))
    sys.exit(1 if report_failures(results) else 0)


def run_suite(device: str, families=None, quick: bool = True, progress: bool = True,
              smoke: bool = False) -> list[Result]:
    """The rows of `families` (default: all) on `device`: the quick or the full configurations. `smoke`: the quick
    configurations with one timed call per timing and no warm-up (harness.smoke_timing), every error check kept;
    raises ValueError with quick=False."""
    from tqdm import tqdm

    if smoke and not quick:
        raise ValueError("a smoke run runs the quick configurations: pass quick=True")
    names = resolve_families(families)
    results: list[Result] = []
    with smoke_timing() if smoke else contextlib.nullcontext():
        for name in tqdm(names, desc="benchmark families", disable=not progress):
            results.extend(FAMILIES[name](device, quick=quick))
    return results


__all__ = ["ALIASES", "FAMILIES", "FAMILY_OPS", "Result", "device_isa", "failures", "family_main", "format_table",
           "machine_description", "plot", "read_bandwidth_gbps", "report_failures", "resolve_families", "run_suite",
           "smoke_timing", "title", "write_json"]
