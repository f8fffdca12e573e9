"""Bit packing benchmark, all shapes: `python bench/bench_bitpack.py [--device cuda] [--json PATH]`."""
import argparse

import torch

from blockops.bench import bitpack, format_table, machine_description, read_bandwidth_gbps, write_json

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench_results/bitpack.json")
    args = parser.parse_args()
    results = bitpack.run(args.device, quick=False)
    write_json(results, args.json, args.device)
    print(f"{machine_description(args.device)}; read bandwidth {read_bandwidth_gbps(args.device):.1f} GB/s")
    print(format_table(results))
