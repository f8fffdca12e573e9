"""Benchmarks of every kernel family (used by `python -m blockops bench` and the scripts in bench/).

Each family module has `run(device, quick=True) -> list[Result]`; FAMILIES lists them in suite order.
"""
from __future__ import annotations

from blockops.bench import attention, bitpack, block_cache, dllm, lowbit, path, ptq161, vq
from blockops.bench.harness import Result, format_table, machine_description, plot, read_bandwidth_gbps, write_json

FAMILIES = {
    "bitpack": bitpack.run,
    "lowbit": lowbit.run,
    "attention": attention.run,
    "path": path.run,
    "vq": vq.run,
    "ptq161": ptq161.run,
    "dllm": dllm.run,
    "block_cache": block_cache.run,
}


def family_main(name: str) -> None:
    """Command line of a bench/bench_<family>.py script: every shape of one family, table and JSON."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=f"blockops {name} benchmark, all shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=f"bench_results/{name}.json")
    args = parser.parse_args()
    results = FAMILIES[name](args.device, quick=False)
    write_json(results, args.json, args.device)
    print(f"{machine_description(args.device)}; read bandwidth {read_bandwidth_gbps(args.device):.1f} GB/s")
    print(format_table(results))


def run_suite(device: str, families=None, quick: bool = True, progress: bool = True) -> list[Result]:
    from tqdm import tqdm

    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; known: {list(FAMILIES)}")
    results: list[Result] = []
    for name in tqdm(names, desc="benchmark families", disable=not progress):
        results.extend(FAMILIES[name](device, quick=quick))
    return results


__all__ = ["FAMILIES", "family_main", "Result", "format_table", "machine_description", "plot", "read_bandwidth_gbps", "run_suite",
           "write_json"]
