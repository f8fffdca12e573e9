"""Low-bit GEMM benchmark, all shapes (Llama-2/3 layers, batch 1..512): `python bench/bench_lowbit.py
[--device cuda] [--json PATH]`. Baselines in the same run: F.linear fp32/bf16 and torch's int4 kernel (CPU),
fp16 cuBLAS (GPU)."""
import argparse

import torch

from blockops.bench import format_table, lowbit, machine_description, read_bandwidth_gbps, write_json

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench_results/lowbit.json")
    args = parser.parse_args()
    results = lowbit.run(args.device, quick=False)
    write_json(results, args.json, args.device)
    print(f"{machine_description(args.device)}; read bandwidth {read_bandwidth_gbps(args.device):.1f} GB/s")
    print(format_table(results))
