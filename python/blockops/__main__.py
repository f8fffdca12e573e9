"""Command line: `python -m blockops bench [--device cpu|cuda] [--full] [--json PATH] [--plot PATH]`,
`python -m blockops info`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockops")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark every kernel family against its PyTorch baseline")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    bench.add_argument("--family", action="append", help="only this family (repeatable)")
    bench.add_argument("--full", action="store_true", help="all shapes, not the quick suite")
    bench.add_argument("--json", metavar="PATH", help="write results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-ups")
    sub.add_parser("info", help="print what this build contains")
    args = parser.parse_args(argv)

    import torch

    import blockops

    if args.command == "info":
        print(json.dumps(blockops.build_info(), indent=2))
        return 0

    from blockops.bench import format_table, machine_description, plot, read_bandwidth_gbps, run_suite, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_suite(device, args.family, quick=not args.full)
    title = (f"blockops {blockops.__version__} on {machine_description(device)}; "
             f"read bandwidth {read_bandwidth_gbps(device):.1f} GB/s")
    if args.json:
        write_json(results, args.json, device)
    if args.plot:
        plot(results, args.plot, title)
    print(title)
    print(format_table(results))
    bad = [r for r in results if r.note == "MISMATCH"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
