"""Shared benchmark harness: timing (warm-up, then the median of repeats), result rows with the baseline
measured in the same run and a checked error, a printed table, JSON and an optional PNG plot.

Smoke mode (``smoke_timing()``; ``run_suite(..., smoke=True)``, ``python -m blockops bench --smoke``): every
``time_ms`` call makes one timed call and no warm-up, whatever its arguments, so that the whole quick suite runs
cheaply with every error check kept (its timings are single cold calls: not figures to quote).

Every row that runs a kernel carries ``max_error`` (measured outside the timed region, against
``blockops.reference`` or an fp64 computation on the same inputs, in the measure its family's module documents)
and ``tolerance`` (the largest acceptable error, from the kernel's accuracy contract); ``Result.ok`` says whether
it holds. Rows that check nothing (whole-sampler timings) have ``tolerance=None``. ``Result.isa`` names the code
path: the CPU ISA path of this process (``blockops.build_info()["cpu_isa_path"]``, capped by ``BLOCKOPS_CPU_ISA``)
or the GPU's ``sm_XY``."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

# Unit roundoff u of each floating-point dtype (half the distance from 1 to the next number): rounding a value
# to the dtype changes it by at most u of itself. Half-precision tolerances are written in units of u.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in fp64: the error relative to the output's magnitude (NaN anywhere in
    ``out`` gives NaN)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).abs().max() / ref.abs().max()).item()


def rel_rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``rms(out - ref) / rms(ref)`` in fp64 (flash-linear-attention's measure; NaN anywhere in ``out`` gives
    NaN)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref|`` in fp64 (integers compare exactly: any difference is >= 1)."""
    if out.shape != ref.shape:
        return float("inf")
    if out.numel() == 0:
        return 0.0
    if out.is_floating_point() and not torch.isfinite(out).all():
        return float("nan")
    return (out.double() - ref.double()).abs().max().item()


@functools.lru_cache(maxsize=None)
def device_isa(device: str) -> str:
    """The code path of a device's rows: the CPU ISA path of this process (``"avx512-vbmi"``, ``"avx512-vnni"``,
    ``"avx2"`` or ``"portable"``), or ``"sm_XY"`` for a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"sm_{major}{minor}"
    if dev.type != "cpu":
        return dev.type
    import blockops

    info = blockops.build_info()
    return info.get("cpu_isa_path") or info.get("cpu_isa", "unknown")


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
    max_error: float | None = None   # measured error vs the reference, in the family's measure (None: not measured)
    note: str = ""
    tolerance: float | None = None   # the largest acceptable max_error (None: the row checks nothing)
    isa: str = ""              # code path: CPU ISA path or "sm_XY" (filled in from the device when empty)

    def __post_init__(self):
        if not self.isa:
            object.__setattr__(self, "isa", device_isa(self.device))

    @property
    def ok(self) -> bool:
        """max_error <= tolerance (False for NaN or an unmeasured error); True for rows without a tolerance."""
        if self.tolerance is None:
            return True
        return self.max_error is not None and self.max_error <= self.tolerance

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
        d.update(speedup=self.speedup, gbps=self.gbps, tflops=self.tflops, ok=self.ok)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        """A row read back from JSON (the derived fields are recomputed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok]


def report_failures(results: list[Result], file=None) -> int:
    """Prints every row whose error exceeds its tolerance (family, op, shape, error, tolerance) on stderr;
    returns how many there were."""
    bad = failures(results)
    file = sys.stderr if file is None else file
    for r in bad:
        err = "not measured" if r.max_error is None else f"{r.max_error:.3g}"
        print(f"FAILED {r.family} | {r.op} | {r.shape} | {r.device} {r.isa} | baseline {r.baseline}: "
              f"error {err} > tolerance {r.tolerance:.3g}", file=file)
    if bad:
        print(f"{len(bad)} of {len(results)} benchmark rows exceed their error tolerance", file=file)
    return len(bad)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_smoke = False


def smoke_mode() -> bool:
    """Whether time_ms runs in smoke mode (one timed call, no warm-up; see the module docstring)."""
    return _smoke


@contextlib.contextmanager
def smoke_timing(enabled: bool = True):
    """Within the block, time_ms makes one timed call and no warm-up whatever its arguments (enabled=False: the
    normal timing); the previous mode is restored on exit."""
    global _smoke
    previous, _smoke = _smoke, enabled
    try:
        yield
    finally:
        _smoke = previous


def time_ms(fn: Callable[[], object], device: str, warmup: int = 2, min_repeats: int = 5,
            min_seconds: float = 0.2, max_repeats: int = 200, between: Callable[[], object] | None = None) -> float:
    """Median wall time of fn() in milliseconds: `warmup` untimed calls, then at least `min_repeats` timed
    calls and at least `min_seconds` in total (capped at `max_repeats`). With `between`, an untimed call of it
    precedes every call of fn (time_ms_in_model). In smoke mode: one timed call, no warm-up."""
    if _smoke:
        warmup, min_repeats, min_seconds, max_repeats = 0, 1, 0.0, 1
    for _ in range(warmup):
        if between is not None:
            between()
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < min_seconds):
        if between is not None:
            between()
            synchronize(device)
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


def model_rows(family: str, op: str, shape: str, device: str, ours_fn: Callable[[], object], x: torch.Tensor,
               in_features: int, out_features: int, **row) -> list[Result]:
    """The "as a model runs" figure of a CPU GEMV row (issue 18): blockops and fp32 F.linear of the same shape, each
    call right after an untimed fp32 F.linear of another layer [out, in] (other weights, so the thread pool has just
    finished other work and the kernel's data may have left the caches), as the layers of a model alternate. A
    tight loop of one op alone flatters per-call set-up and thread hand-over; this row shows them. `row`: the
    Result fields of the tight-loop row (bytes_moved, max_error, tolerance, ...)."""
    g = torch.Generator().manual_seed(7)
    other_w = torch.randn(out_features, in_features, generator=g)
    own_w = torch.randn(out_features, in_features, generator=g)
    x32 = x.float()
    other = (lambda: torch.nn.functional.linear(x32, other_w))
    ours = time_ms(ours_fn, device, between=other)
    base = time_ms(lambda: torch.nn.functional.linear(x32, own_w), device, between=other)
    note = "each call after an fp32 F.linear of another layer (both sides)"
    return [Result(family, f"{op} in a model", shape, device, ours, "F.linear float32", base, note=note, **row)]


def time_ms_and_result(fn: Callable[[], object], device: str, **timing) -> tuple[float, object]:
    """``(time_ms(fn, device, **timing), the result of fn's last call)``: for a slow baseline whose output is also
    the error reference (a pure-PyTorch reference timed once), so that it runs once, not twice."""
    last = [None]

    def call():
        last[0] = fn()

    return time_ms(call, device, **timing), last[0]


class SharedReferences:
    """Slow references (e.g. a large layer's dense reference weight) built once per run and shared by the rows that
    need them: ``get(key, fn)`` builds ``fn()`` on the first call for `key`, timed (one call: it doubles as a
    reference baseline's time), and returns ``(ms of that build, result)``."""

    def __init__(self, device: str):
        self.device = device
        self._built: dict = {}

    def get(self, key, fn: Callable[[], object]) -> tuple[float, object]:
        if key not in self._built:
            self._built[key] = time_ms_and_result(fn, self.device, warmup=0, min_repeats=1, min_seconds=0.0)
        return self._built[key]


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


def linear_training_step(family: str, op: str, device: str, ours_fn, ref_fn, leaves, ref_leaves,
                         grad: torch.Tensor, generator: torch.Generator, *, tolerance: float, note: str,
                         timing: dict) -> Result:
    """The row of a quantized linear layer's training step (forward + backward): the largest relative error of
    the trainable leaves' gradients (``leaves[0]`` is the activation x) against the reference's, and the step's
    time against ``F.linear``'s fp32 forward + backward with a dense weight of the same shape (drawn from
    ``generator``), in the same run."""
    ours_fn().backward(grad)
    ref_fn().backward(grad)
    err = max(max_rel_error(a.grad, b.grad) for a, b in zip(leaves, ref_leaves))
    ours = time_ms(forward_backward(ours_fn, leaves, grad), device, **timing)
    rows, in_features = leaves[0].shape
    out_features = grad.shape[-1]
    w = torch.randn(out_features, in_features, device=device, generator=generator).requires_grad_(True)
    xd = leaves[0].detach().clone().requires_grad_(True)
    base = time_ms(forward_backward(lambda: torch.nn.functional.linear(xd, w), (xd, w), grad), device, **timing)
    return Result(family, op, f"{in_features}x{out_features} M={rows}", device, ours,
                  "F.linear fp32 fwd+bwd (dense weight)", base, flops=3 * 2.0 * rows * in_features * out_features,
                  max_error=err, tolerance=tolerance, note=note)


def _fmt_error(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def check_mark(r: Result) -> str:
    """The table's check column: "ok", "FAIL" (error above tolerance, NaN or unmeasured), "-" (no tolerance)."""
    if r.tolerance is None:
        return "-"
    return "ok" if r.ok else "FAIL"


def format_table(results: list[Result]) -> str:
    header = ["family", "op", "shape", "dev", "isa", "blockops ms", "baseline", "base ms", "speed-up", "GB/s",
              "TFLOP/s", "max err", "tol", "check", "note"]
    rows = [[r.family, r.op, r.shape, r.device, r.isa, f"{r.ours_ms:.4g}", r.baseline, f"{r.baseline_ms:.4g}",
             f"{r.speedup:.2f}x", f"{r.gbps:.1f}" if r.gbps else "-", f"{r.tflops:.2f}" if r.tflops else "-",
             _fmt_error(r.max_error), _fmt_error(r.tolerance), check_mark(r), r.note] for r in results]
    return _layout(header, rows)


def _layout(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def isa_description(device: str) -> str:
    """The code path of a run, for its title: e.g. "CPU ISA path avx512-vbmi", "CPU ISA path avx2
    (BLOCKOPS_CPU_ISA=avx2)" or, on a GPU, "sm_90 (CPU ISA path avx512-vbmi)"."""
    import blockops

    forced = blockops.build_info().get("cpu_isa_forced", "")
    cpu = f"CPU ISA path {device_isa('cpu')}" + (f" (BLOCKOPS_CPU_ISA={forced})" if forced else "")
    if torch.device(device).type == "cuda":
        return f"{device_isa(device)} ({cpu})"
    return cpu


def title(device: str, bandwidth_gbps: float | None = None, smoke: bool = False) -> str:
    """The first line of a printed table: version, machine, ISA path, read bandwidth (and, for a smoke run, that
    its timings are single cold calls)."""
    import blockops

    bandwidth = read_bandwidth_gbps(device) if bandwidth_gbps is None else bandwidth_gbps
    return (f"blockops {blockops.__version__} on {machine_description(device)}; {isa_description(device)}; "
            f"read bandwidth {bandwidth:.1f} GB/s"
            + ("; smoke run: one cold call per timing, not figures to quote" if smoke else ""))


def write_json(results: list[Result], path: str, device: str, bandwidth_gbps: float | None = None,
               smoke: bool = False) -> None:
    import blockops

    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(device),
        "isa": device_isa(device),
        "read_bandwidth_gbps": read_bandwidth_gbps(device) if bandwidth_gbps is None else bandwidth_gbps,
        "smoke": smoke,
        "build": blockops.build_info(),
        "results": [r.as_dict() for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def plot(results: list[Result], path: str, title: str) -> None:
    """A PNG of the rows' speed-ups (`figure`) at ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(results, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(results: list[Result], title: str):
    """The bar chart of the rows' speed-ups over their baselines, on a log axis, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.op}\n{r.shape}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results)), 4))
    ax.bar(range(len(results)), [r.speedup for r in results], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    # Speed-ups span 0.5x to a few hundred x: on a linear axis the 1x bars would vanish next to the 100x ones.
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over baseline (x, log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
