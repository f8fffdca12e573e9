"""Shared benchmark harness: timing (warm-up, then the median of repeats), result rows with the baseline
measured in the same run, a printed table, JSON and an optional PNG plot."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Result:
    family: str          # kernel family, e.g. "bitpack"
    op: str              # what was timed, e.g. "pack_bits 2-bit dim0"
    shape: str           # problem size in the family's words, e.g. "4096x11008"
    device: str          # "cpu" or "cuda"
    ours_ms: float       # blockops, median milliseconds
    baseline: str        # what it is compared with, e.g. "torch reference"
    baseline_ms: float   # the baseline, median milliseconds, same run
    bytes_moved: float = 0.0   # bytes read + written by blockops' kernel (for GB/s)
    flops: float = 0.0         # useful floating-point operations (for TFLOP/s)
    max_error: float = 0.0     # max |ours - reference| (0 for exact ops)
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ours_ms if self.ours_ms > 0 else float("nan")

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.ours_ms * 1e-3) / 1e9 if self.bytes_moved else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / (self.ours_ms * 1e-3) / 1e12 if self.flops else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(speedup=self.speedup, gbps=self.gbps, tflops=self.tflops)
        return d


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int = 2, min_repeats: int = 5,
            min_seconds: float = 0.2, max_repeats: int = 200) -> float:
    """Median wall time of fn() in milliseconds: `warmup` untimed calls, then at least `min_repeats` timed
    calls and at least `min_seconds` in total (capped at `max_repeats`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < min_seconds):
        if torch.device(device).type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_description(device: str) -> str:
    """e.g. 'AMD EPYC 9654 (2 threads), torch 2.14.1' or 'NVIDIA H200, torch 2.11.0'."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    return f"{name}, torch {torch.__version__}"


def read_bandwidth_gbps(device: str, megabytes: int = 256) -> float:
    """Achievable read bandwidth: GB/s of summing a large fp32 tensor (the limit memory-bound kernels such
    as small-batch GEMV are held against), measured in the same run."""
    t = torch.ones(megabytes * 2**20 // 4, device=device)
    ms = time_ms(lambda: t.sum(), device, min_repeats=5, min_seconds=0.3)
    return t.numel() * 4 / (ms * 1e-3) / 1e9


def forward_backward(fn, inputs, grad):
    """A step for time_ms: clear the inputs' gradients, run fn() and backpropagate grad through its output."""
    def step():
        for x in inputs:
            x.grad = None
        fn().backward(grad)
    return step


def format_table(results: list[Result]) -> str:
    header = ["family", "op", "shape", "dev", "blockops ms", "baseline", "base ms", "speed-up", "GB/s", "TFLOP/s",
              "max err", "note"]
    rows = [[r.family, r.op, r.shape, r.device, f"{r.ours_ms:.4g}", r.baseline, f"{r.baseline_ms:.4g}",
             f"{r.speedup:.2f}x", f"{r.gbps:.1f}" if r.gbps else "-", f"{r.tflops:.2f}" if r.tflops else "-",
             f"{r.max_error:.2g}", r.note] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(results: list[Result], path: str, device: str) -> None:
    import blockops

    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(device),
        "read_bandwidth_gbps": read_bandwidth_gbps(device),
        "build": blockops.build_info(),
        "results": [r.as_dict() for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.op}\n{r.shape}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results)), 4))
    ax.bar(range(len(results)), [r.speedup for r in results], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over baseline (x)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
