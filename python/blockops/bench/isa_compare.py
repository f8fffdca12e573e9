"""`python -m blockops bench --cpu-isa avx2,native`: the suite once per CPU ISA cap, each run in a child process with
``BLOCKOPS_CPU_ISA`` set (``native``: unset; the library chooses its ISA once, at import, so one process cannot run
two), then one side-by-side table and, with ``--json``, the merged results.

A row is matched across the runs by (family, op, shape, baseline): family, op and shape name what blockops ran,
and several rows of one op and shape differ only in their baseline. Per run the table shows blockops' ms, the
speed-up over the row's baseline and, for every run after the first, how much faster blockops ran there than in the
first run (first ms / this ms). The check column says "ok" when every run's error is within its tolerance, names
the failing runs otherwise and is "-" for rows without a tolerance. Each child prints its failing rows on stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from blockops.bench.harness import Result, _layout, machine_description

# Values of --cpu-isa: the caps BLOCKOPS_CPU_ISA understands, and "native" (unset: the widest path the CPU has).
ISA_CAPS = ("native", "avx2", "portable")


def parse_isa_list(text: str) -> list[str]:
    caps = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [c for c in caps if c not in ISA_CAPS]
    if not caps or unknown:
        raise ValueError(f"--cpu-isa takes a comma-separated list of {', '.join(ISA_CAPS)}; got {text!r}")
    if len(set(caps)) != len(caps):
        raise ValueError(f"--cpu-isa lists an ISA twice: {text!r}")
    return caps


def child_env(cap: str) -> dict:
    """This process's environment with BLOCKOPS_CPU_ISA set to `cap` (removed for native) and this blockops first on
    PYTHONPATH, so that the child imports the same package."""
    import blockops

    env = dict(os.environ)
    env.pop("BLOCKOPS_CPU_ISA", None)
    if cap != "native":
        env["BLOCKOPS_CPU_ISA"] = cap
    root = os.path.dirname(os.path.dirname(os.path.abspath(blockops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_child(cap: str, families: list[str], full: bool, json_path: str, smoke: bool = False) -> tuple[int, str]:
    """One `python -m blockops bench --device cpu` run under `cap` (`--smoke` with smoke); its stderr (progress,
    failing rows) passes through. Returns (exit status, its stdout: title line and table)."""
    cmd = [sys.executable, "-m", "blockops", "bench", "--device", "cpu", "--json", json_path]
    for family in families:
        cmd += ["--family", family]
    if full:
        cmd.append("--full")
    if smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, env=child_env(cap), stdout=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout


def _key(r: Result) -> tuple:
    return (r.family, r.op, r.shape, r.baseline)


def side_by_side(runs: dict[str, list[Result]]) -> list[dict]:
    """Per matched row (first-seen order): its key fields and, per run that has it, the run's Result."""
    merged: dict[tuple, dict] = {}
    for cap, results in runs.items():
        for r in results:
            entry = merged.setdefault(_key(r), {"family": r.family, "op": r.op, "shape": r.shape,
                                                "baseline": r.baseline, "runs": {}})
            entry["runs"][cap] = r
    return list(merged.values())


def _check(entry: dict) -> str:
    checked = {cap: r for cap, r in entry["runs"].items() if r.tolerance is not None}
    if not checked:
        return "-"
    failing = [cap for cap, r in checked.items() if not r.ok]
    return "FAIL " + ",".join(failing) if failing else "ok"


def format_side_by_side(caps: list[str], entries: list[dict]) -> str:
    first = caps[0]
    header = ["family", "op", "shape", "baseline"]
    for cap in caps:
        header += [f"{cap} ms", f"{cap} x"]
    header += [f"{cap} vs {first}" for cap in caps[1:]] + ["check"]
    rows = []
    for e in entries:
        row = [e["family"], e["op"], e["shape"], e["baseline"]]
        for cap in caps:
            r = e["runs"].get(cap)
            row += ["-", "-"] if r is None else [f"{r.ours_ms:.4g}", f"{r.speedup:.2f}x"]
        for cap in caps[1:]:
            a, b = e["runs"].get(first), e["runs"].get(cap)
            row.append(f"{a.ours_ms / b.ours_ms:.2f}x" if a is not None and b is not None and b.ours_ms > 0 else "-")
        row.append(_check(e))
        rows.append(row)
    return _layout(header, rows)


def main(caps: list[str], families: list[str], full: bool = False, json_path: str | None = None,
         smoke: bool = False) -> int:
    """Runs the children (smoke runs with `smoke`), prints the side-by-side table, writes the merged JSON; 1 when a
    child failed or a row exceeds its tolerance."""
    import blockops

    runs: dict[str, list[Result]] = {}
    payloads: dict[str, dict] = {}
    status = 0
    with tempfile.TemporaryDirectory(prefix="blockops-bench-isa-") as tmp:
        for cap in caps:
            path = os.path.join(tmp, f"{cap}.json")
            print(f"== BLOCKOPS_CPU_ISA={'(unset)' if cap == 'native' else cap}", file=sys.stderr, flush=True)
            rc, _ = run_child(cap, families, full, path, smoke)
            if rc not in (0, 1) or not os.path.exists(path):
                print(f"bench under --cpu-isa {cap} failed (exit status {rc}); its rows are missing", file=sys.stderr)
                status = 1
                continue
            with open(path) as f:
                payloads[cap] = json.load(f)
            runs[cap] = [Result.from_dict(d) for d in payloads[cap]["results"]]
    if not runs:
        return 1
    done = [cap for cap in caps if cap in runs]
    paths = ", ".join(f"{cap} = {payloads[cap].get('isa', '?')}" for cap in done)
    print(f"blockops {blockops.__version__} on {machine_description('cpu')}; CPU ISA paths: {paths}"
          + ("; smoke runs: one cold call per timing, not figures to quote" if smoke else ""))
    entries = side_by_side(runs)
    print(format_side_by_side(done, entries))
    bad = [(cap, r) for cap in done for r in runs[cap] if not r.ok]
    if bad:
        print(f"{len(bad)} rows exceed their error tolerance (listed above by each run)", file=sys.stderr)
        status = 1
    if json_path:
        merged = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine_description("cpu"),
            "cpu_isa_runs": [{"cpu_isa": cap, **{k: v for k, v in payloads[cap].items() if k != "results"}}
                             for cap in done],
            "results": [{**r.as_dict(), "cpu_isa": cap} for cap in done for r in runs[cap]],
            "side_by_side": [{"family": e["family"], "op": e["op"], "shape": e["shape"], "baseline": e["baseline"],
                              **{cap: {k: r.as_dict()[k] for k in ("isa", "ours_ms", "baseline_ms", "speedup",
                                                                   "max_error", "tolerance", "ok")}
                                 for cap, r in e["runs"].items()}}
                             for e in entries],
        }
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(merged, f, indent=2)
    return status
