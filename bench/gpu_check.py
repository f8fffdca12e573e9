#!/usr/bin/env python3
"""GPU check: the one budgeted command that builds blockops for the GPU it runs on, runs every family's CUDA tests,
a compute-sanitizer memcheck pass over every kernel and one benchmark row per goal of docs/performance.md, and
streams everything it learns to OUT as it goes. docs/gpu-check.md says how to run it through the device tool.

    python bench/gpu_check.py --out OUT [--only SEL] [--skip SEL] [--deadline S] [--budget STAGE=S,...] [--dry-run]
    python bench/gpu_check.py --summarize OUT/results.jsonl [MORE.jsonl ...]     # (re)print a summary, merging runs

Stages, in this order, each cut at its own end time (see ``stage_end``): build (setup.py build_ext --inplace for
this GPU's architecture only, on all cores), tests (pytest per family, CUDA cases only, no -x, a per-test timeout,
a crash or a lost CUDA context restarts pytest after the test that caused it), sanitizer (compute-sanitizer
--tool memcheck over bench/gpu_check_worker.py's tiny case of every kernel path, one process per family), bench
(bench/gpu_check_worker.py's items: the goal shapes, baseline in the same run). SEL is a comma list of STAGE or
STAGE:FAMILY (bench also STAGE:ITEM), e.g. ``--only tests:lowbit,bench:attention``; the build runs whenever a
selected stage needs the extension (``--no-build`` skips it).

Files in OUT (at most 8 come back from the device tool): results.jsonl (one JSON object per line, written and
flushed as each is produced: the run, the machine, stage starts and ends, each test, sanitizer case and finding,
bench row, and the summary last), summary.txt, build.log, tests.log, sanitizer.log, bench.log.

``--dry-run`` runs the same stages on the CPU kernels (no build, no compute-sanitizer: the cases run bare, tiny bench
shapes, one timed call per timing) with small budgets: tests/test_gpu_check.py runs it in CI. Children report on a
pipe whose descriptor is in GPU_CHECK_FD (see ``emit``). ``GPU_CHECK_PLANT`` (``hang|crash|fail:STAGE:TEXT``, comma-
separated) plants a fault in the test, case or item whose name contains TEXT: the test of the timeout and restart
paths. This file uses the standard library only: it runs before the extension exists.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "bench")
FAMILIES = ("bitpack", "lowbit", "attention", "path_attention", "vq", "ptq161", "dllm", "block_cache")
STAGES = ("build", "tests", "sanitizer", "bench")
# Test files of each family (in the order the tests stage starts them: longest first); "other" is every other
# tests/test_*.py (the build checks and anything new), CUDA cases only as everywhere.
TEST_FILES = {
    "lowbit": ["test_lowbit.py", "test_quant_pipelines.py"],
    "attention": ["test_attention.py", "test_attention_module.py", "test_block_mask.py"],
    "path_attention": ["test_path_attention.py", "test_path_module.py"],
    "bitpack": ["test_bitpack.py"],
    "block_cache": ["test_block_cache.py"],
    "vq": ["test_vq.py", "test_vq_calibration.py"],
    "dllm": ["test_dllm.py", "test_dllm_ops.py"],
    "ptq161": ["test_ptq161.py"],
}
TEST_GROUPS = tuple(TEST_FILES) + ("other",)
# The bench items of bench/gpu_check_worker.py (BENCH_ITEMS, same order; tests/test_gpu_check.py checks), in the order
# they run: the goals of docs/performance.md first, extras last. FAMILY:WHAT, "limits" the device's own ceilings.
BENCH_ITEM_IDS = ("limits", "lowbit:4096x14336:M1", "lowbit:4096x14336:M16", "vq:4096x11008:M1", "vq:4096x11008:M16",
                  "ptq161:4096x14336:M1", "ptq161:4096x14336:M16", "attention:longgen", "attention:causal",
                  "attention:hopper-wgmma", "lowbit:hopper-wgmma-prefill",
                  "path_attention:T16384", "dllm:unmask", "block_cache:indicator", "bitpack:pack2b",
                  "dllm:kv_overwrite", "path_attention:decode", "lowbit:8192x28672:M1",
                  "path_attention:T1024-fwd+bwd", "attention:ring-longgen-1rank")
# Tests that run in the tests stage although they are no CUDA cases: they check the build itself (the one that
# configures a second, CPU build is left out: minutes).
ALWAYS_TESTS = ("test_build.py::test_build_info_describes_the_build",
                "test_build.py::test_expected_cuda_architectures_were_built",
                "test_build.py::test_ptx_is_embedded_for_newer_gpus", "test_build.py::test_no_gpu_touched_at_import")

# Seconds. The device tool allows 600 s per command; the check ends by DEADLINE, leaving time for the tool's own
# transfers and a margin. Later stages' budgets are reserved: a stage may use what earlier stages left unused, never
# what a later stage needs (stage_end). docs/gpu-check.md explains the split.
DEADLINE = 540
BUDGETS = {"build": 150, "tests": 170, "sanitizer": 80, "bench": 110}
SUMMARY_RESERVE = 8
ITEM_TIMEOUTS = {"tests": 90, "sanitizer": 60, "bench": 90}
DRY_DEADLINE = 240
DRY_BUDGETS = {"build": 0, "tests": 120, "sanitizer": 45, "bench": 60}
DRY_ITEM_TIMEOUTS = {"tests": 60, "sanitizer": 30, "bench": 30}
MIN_STAGE_SECONDS = 3
MAX_RESTARTS = 30
EXIT_CONTEXT_LOST = 75

# The H200's limits. Spec: the datasheet (HBM3e 4.8 TB/s; dense bf16 tensor cores 989 TFLOP/s). Measured: what this
# workplace's H200s reached (a device-to-device copy, bytes read + written: 4.3 TB/s; an 8192^3 bf16 matmul on random
# data: 790 TFLOP/s; /work/.library/device/KINDS.md), replaced by the bench stage's own "limits" item when it ran.
H200 = {"hbm_gbps_spec": 4800.0, "hbm_gbps_measured": 4300.0, "bf16_tflops_spec": 989.0, "bf16_tflops_measured": 790.0}

STICKY_CUDA_ERRORS = re.compile(r"illegal memory access|illegal address|unspecified launch failure|device-side assert|"
                                r"misaligned address|illegal instruction|CUDA error: unknown error|launch timed out",
                                re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------------
# The record protocol of the children (bench/gpu_check_worker.py, bench/gpu_check_pytest.py)
# ---------------------------------------------------------------------------------------------------------------------

_emit_lock = threading.Lock()
_emit_fd: list = []          # the descriptor in use: GPU_CHECK_FD, or -1 for stdout
RECORD_PREFIX = "@@gpu_check@@ "


def emit(**record) -> None:
    """Sends one record to the parent: a JSON line on the descriptor GPU_CHECK_FD. Without one, or when it does not
    work (a launcher in between, e.g. compute-sanitizer, that closed it), the line goes to stdout behind
    RECORD_PREFIX, where the parent's output reader picks it up."""
    line = json.dumps(record, default=str, allow_nan=True) + "\n"
    with _emit_lock:
        if not _emit_fd:
            _emit_fd.append(int(os.environ.get("GPU_CHECK_FD", "-1")))
        if _emit_fd[0] >= 0:
            try:
                view = memoryview(line.encode())
                while view:
                    view = view[os.write(_emit_fd[0], view):]
                return
            except OSError:
                _emit_fd[0] = -1
        sys.stdout.write(RECORD_PREFIX + line)
        sys.stdout.flush()


def planted_fault(stage: str, name: str) -> None:
    """Plants the fault GPU_CHECK_PLANT names for this stage and item (tests only): hang, crash or fail."""
    for spec in filter(None, os.environ.get("GPU_CHECK_PLANT", "").split(",")):
        action, _, rest = spec.partition(":")
        where, _, text = rest.partition(":")
        if where != stage or text not in name:
            continue
        if action == "hang":
            time.sleep(1e6)
        elif action == "crash":
            os.abort()
        elif action == "fail":
            raise RuntimeError(f"planted failure ({spec})")


def tail_text(text: str, limit: int) -> str:
    """The last `limit` characters of text (whole lines where possible)."""
    text = text.rstrip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    return cut[cut.find("\n") + 1:] if "\n" in cut[:200] else cut


# ---------------------------------------------------------------------------------------------------------------------
# Selection and budgets
# ---------------------------------------------------------------------------------------------------------------------

def parse_selection(text: str | None, bench_items=()) -> dict[str, set | None]:
    """``"tests:lowbit,bench,sanitizer:vq"`` -> {"tests": {"lowbit"}, "bench": None, "sanitizer": {"vq"}} (None: the
    whole stage). Raises ValueError naming an unknown stage or family."""
    selection: dict[str, set | None] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        stage, _, what = part.partition(":")
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} in {part!r}; stages: {', '.join(STAGES)}")
        if not what:
            selection[stage] = None
            continue
        known = {"tests": TEST_GROUPS, "sanitizer": FAMILIES, "bench": FAMILIES + ("limits",) + tuple(bench_items),
                 "build": ()}[stage]
        if what not in known:
            raise ValueError(f"unknown {stage} selection {what!r} in {part!r}; known: {', '.join(known)}")
        if stage in selection and selection[stage] is None:
            continue
        selection.setdefault(stage, set()).add(what)
    return selection


def selected(stage: str, what: str, only: dict, skip: dict) -> bool:
    """Whether `what` (a family, group or item) of `stage` runs under --only / --skip."""
    if only and stage not in only:
        return False
    if only and only[stage] is not None and what not in only[stage]:
        return False
    if stage in skip and (skip[stage] is None or what in skip[stage]):
        return False
    return True


def bench_selected(item: str, only: dict, skip: dict) -> bool:
    """A bench item runs when its id or its family (the part before ':') is selected."""
    family = item.split(":", 1)[0]
    if only and "bench" not in only:
        return False
    if only and only["bench"] is not None and not ({item, family} & only["bench"]):
        return False
    if "bench" in skip and (skip["bench"] is None or {item, family} & skip["bench"]):
        return False
    return True


def scale_budgets(budgets: dict, stages: list, available: float) -> dict:
    """The budgets of `stages`, scaled down together when they do not fit in `available` seconds."""
    total = sum(budgets[s] for s in stages)
    factor = min(1.0, available / total) if total > 0 else 1.0
    return {s: budgets[s] * factor for s in stages}


def stage_end(now: float, deadline: float, later_budgets: list[float], reserve: float = SUMMARY_RESERVE) -> float:
    """When a stage starting at `now` must end: the run's deadline minus the summary's reserve and the budgets of
    the stages after it. A stage thus gets its own budget plus whatever earlier stages left unused, and can never eat
    into a later stage's budget."""
    return max(now, deadline - reserve - sum(later_budgets))


# ---------------------------------------------------------------------------------------------------------------------
# Output: results.jsonl and the logs
# ---------------------------------------------------------------------------------------------------------------------

class Results:
    """results.jsonl: one record per line, flushed as written (a kill keeps every finished line); kept in memory
    for the summary."""

    def __init__(self, path: str, t0: float):
        self.path, self.t0 = path, t0
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)

    def write(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "t": round(time.time() - self.t0, 2), **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self.records.append(record)
        return record

    def close(self) -> None:
        self._file.close()


class Log:
    """A log file written line by line, flushed, by several threads."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1, errors="replace")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text if text.endswith("\n") else text + "\n")
            self._file.flush()


def say(text: str) -> None:
    """Progress on stdout (short: the device tool returns the last 12,000 characters, which end with the summary)."""
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Child jobs: one process at a time runs a job's items in order; restarts after a crash, hang or lost context
# ---------------------------------------------------------------------------------------------------------------------

_live: set = set()
_live_lock = threading.Lock()


def kill_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGABRT to the child's process group (Python's faulthandler then prints every thread's stack to the log),
    SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGABRT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Kills what is left of an exited child's process group (compile workers, a sanitized target)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Job:
    """The items of one stage and family, run in order by the child `command(skip_file)` (the file lists the items
    already done), which reports on GPU_CHECK_FD. A child that dies, loses its CUDA context or outlives the item
    timeout (killed) is followed by a fresh one for the items left, until the stage's end time; what never ran is
    recorded as not_run. `on_line(line, state)` sees every line of the child's output (the sanitizer's findings),
    `on_exit(state, rc)` each child's end."""

    kinds = {"tests": "test", "sanitizer": "case", "bench": "bench_item"}

    def __init__(self, ctx, stage: str, family: str, command, env: dict, log: Log, item_timeout: float,
                 on_line=None, on_exit=None):
        self.ctx, self.stage, self.family, self.command, self.env = ctx, stage, family, command, env
        self.log, self.item_timeout, self.on_line, self.on_exit = log, item_timeout, on_line, on_exit
        self.items: list | None = None
        self.done: dict[str, str] = {}
        self.status = "ok"

    def write_item(self, item: str, outcome: str, **fields) -> None:
        self.done[item] = outcome
        rec = self.ctx.results.write(self.kinds[self.stage], stage=self.stage, family=self.family, item=item,
                                     outcome=outcome, **fields)
        if self.stage == "bench":
            for row in fields.get("rows", []):
                if row.get("family") == "limits":
                    self.ctx.update_limits(row)
                row = enrich_bench_row(row, self.ctx.limits)
                self.ctx.results.write("bench", stage="bench", item=item, **row)
                self.log.write(f"[bench] {item}: {row.get('op')} | {row.get('shape')} | "
                               f"{_num(row.get('ours_ms'), 4)} ms | {row.get('baseline')} "
                               f"{_num(row.get('baseline_ms'), 4)} ms | {_num(row.get('speedup'), 3)}x | {_rate(row)} | "
                               f"of limit {_pct(row.get('fraction_measured'))} "
                               f"(spec {_pct(row.get('fraction_spec'))})"
                               f" | err {_num(row.get('max_error'), 2)} tol {_num(row.get('tolerance'), 2)}")
        if self.stage != "tests":
            self.log.write(f"[{self.family}] {self.kinds[self.stage]} {item!r}: {outcome}"
                           + (f" in {fields['seconds']} s" if "seconds" in fields else "")
                           + (f"; kernels {sorted(fields.get('kernels') or {})}" if fields.get("kernels") else "")
                           + (f"; path_ok {fields['path_ok']}" if "path_ok" in fields else ""))
        if outcome not in ("ok", "passed", "skipped", "not_run"):
            message = (fields.get("message") or "").strip().splitlines()
            say(f"  {self.stage} {self.family}: {outcome.upper()} {item}" + (f" -- {message[-1][:160]}" if message
                                                                                else ""))
        return rec

    def run(self, end: float) -> str:
        stalls = 0
        while True:
            if self.items is not None and all(i in self.done for i in self.items):
                break
            if end - time.monotonic() < 1.0:
                self.status = "timeout"
                break
            progress_before = len(self.done)
            reason, rc = self._run_child(end)
            if reason == "deadline":
                self.status = "timeout"
                break
            if self.items is None:
                self.status = "error"
                self.ctx.results.write("job_error", stage=self.stage, family=self.family, rc=rc,
                                       message=f"the child exited (status {rc}) before listing its items; see the log")
                say(f"  {self.stage} {self.family}: child failed before listing its items (status {rc})")
                break
            if all(i in self.done for i in self.items):
                break
            stalls = stalls + 1 if len(self.done) == progress_before else 0
            self.ctx.results.write("restart", stage=self.stage, family=self.family, rc=rc, reason=reason,
                                   done=len(self.done), left=len(self.items) - len(self.done))
            if stalls >= 2 or self.ctx.restarts_left(self) <= 0:
                self.status = "error"
                break
        if self.items is None and self.status == "timeout":
            self.ctx.results.write("job_not_run", stage=self.stage, family=self.family,
                                   message="the stage's end time came before this job listed its items")
        left = [i for i in (self.items or []) if i not in self.done]
        why = {"timeout": "the stage's end time came first", "error": "the child kept failing"}.get(self.status, "")
        for item in left:
            self.write_item(item, "not_run", message=why)
        if left:
            say(f"  {self.stage} {self.family}: {len(left)} not run ({why})")
        return self.status

    def _run_child(self, end: float):
        rfd, wfd = os.pipe()
        fd, skip_path = tempfile.mkstemp(prefix="gpu_check_skip_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(self.done), f)
        env = dict(self.env, GPU_CHECK_FD=str(wfd))
        proc = subprocess.Popen(self.command(skip_path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(wfd,),
                                start_new_session=True)
        os.close(wfd)
        with _live_lock:
            _live.add(proc)
        state = {"in_flight": None, "started": 0.0, "tail": collections.deque(maxlen=60)}
        pump = threading.Thread(target=self._pump, args=(proc, state), daemon=True)
        pump.start()
        reason, buf = None, b""
        try:
            while True:
                now = time.monotonic()
                wait = end - now
                if state["in_flight"] is not None:
                    wait = min(wait, state["started"] + self.item_timeout - now)
                if wait <= 0:
                    reason = "deadline" if end - now <= 0 else "timeout"
                    kill_group(proc)
                    break
                ready, _, _ = select.select([rfd], [], [], min(wait, 0.5))
                if ready:
                    chunk = os.read(rfd, 1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                    buf = self._records_of(buf, state)
                elif proc.poll() is not None:
                    # Exited (a grandchild may still hold the pipe open): read what is left, then stop.
                    while select.select([rfd], [], [], 0)[0]:
                        chunk = os.read(rfd, 1 << 16)
                        if not chunk:
                            break
                        buf += chunk
                    buf = self._records_of(buf, state)
                    break
            rc = proc.wait()
            _reap(proc)
        finally:
            os.close(rfd)
            os.unlink(skip_path)
            with _live_lock:
                _live.discard(proc)
        pump.join(timeout=5)
        if self.on_exit:
            self.on_exit(state, rc)
        item = state["in_flight"]
        if item is not None:
            tail = tail_text("\n".join(state["tail"]), 2500)
            seconds = round(time.monotonic() - state["started"], 1)
            if reason == "timeout":
                self.write_item(item, "timeout", seconds=seconds, log_tail=tail,
                                message=f"no result within the {self.item_timeout:.0f} s item timeout; killed "
                                        f"(Python stacks in the log)")
            elif reason == "deadline":
                self.write_item(item, "timeout", seconds=seconds, log_tail=tail,
                                message="still running at the stage's end time; killed (Python stacks in the log)")
            else:
                self.write_item(item, "crashed", seconds=seconds, log_tail=tail,
                                message=f"the process died during this item (exit status {rc})")
        return reason or "exit", rc

    def _records_of(self, buf: bytes, state) -> bytes:
        """Records every complete line of buf; returns the incomplete rest."""
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            self._record(line, state)
        return buf

    def _record(self, line: bytes, state) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            self.log.write(f"[{self.family}] unreadable record: {line[:200]!r}")
            return
        kind = rec.pop("kind", "")
        if kind == "items":
            if self.items is None:
                self.items = list(rec["items"])
                self.ctx.results.write("collected", stage=self.stage, family=self.family, count=len(self.items),
                                       items=self.items)
            else:      # a restart: anything new (a collection that changed) is added
                self.items += [i for i in rec["items"] if i not in self.items]
        elif kind == "start":
            state["in_flight"], state["started"] = rec["item"], time.monotonic()
        elif kind == "end":
            state["in_flight"] = None
            item, outcome = rec.pop("item"), rec.pop("outcome")
            self.write_item(item, outcome, **rec)
        elif kind == "build_info":      # every child sends it; the first one is kept (unless the build wrote one)
            with self.ctx.lock:
                if not any(r.get("kind") == "build_info" for r in self.ctx.results.records):
                    self.ctx.results.write("build_info", **rec)
        elif kind == "context_lost":
            self.ctx.results.write("context_lost", stage=self.stage, family=self.family, item=rec.get("item"))
            say(f"  {self.stage} {self.family}: CUDA context lost after {rec.get('item')}; restarting the process")
        else:
            self.ctx.results.write(kind or "note", stage=self.stage, family=self.family, **rec)

    def _pump(self, proc, state) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(RECORD_PREFIX):     # a record sent on stdout (see emit)
                self._record(line[len(RECORD_PREFIX):].encode(), state)
                continue
            state["tail"].append(line)
            self.log.write(f"[{self.family}] {line}")
            if self.on_line:
                self.on_line(line, state)
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------------------------------
# compute-sanitizer output
# ---------------------------------------------------------------------------------------------------------------------

class SanitizerParser:
    """Turns compute-sanitizer's report lines (``========= ...``) into finding records, each attributed to the case
    in flight when its first line arrived (the worker synchronizes after every case, so a kernel's report comes
    before the case ends; the kernel name in ``where`` is the check on that), and records the process's ERROR
    SUMMARY."""

    PREFIX = "========= "

    def __init__(self, ctx, family: str):
        self.ctx, self.family = ctx, family
        self.current: dict | None = None
        self.summaries: list[int] = []

    def line(self, line: str, state) -> None:
        if not line.startswith(self.PREFIX.rstrip()):
            return
        body = line[len(self.PREFIX):] if line.startswith(self.PREFIX) else ""
        if body.startswith("    ") and self.current is not None:
            detail = body.strip()
            if len(self.current["details"]) < 12:
                self.current["details"].append(detail)
            if self.current["where"] is None and detail.startswith("at "):
                self.current["where"] = detail[3:][:400]
            return
        self.flush()
        text = body.strip()
        match = re.match(r"ERROR SUMMARY: (\d+) error", text)
        if match:
            self.summaries.append(int(match.group(1)))
            return
        if not text or text.startswith("COMPUTE-SANITIZER") or text.startswith("Target application"):
            return
        category = "api" if ("CUDA API call" in text or text.startswith("Program hit")) else \
            "leak" if text.startswith("Leaked") else "memory"
        self.current = {"text": text[:300], "category": category, "case": state["in_flight"], "where": None,
                        "details": []}

    def flush(self) -> None:
        if self.current is not None:
            self.ctx.results.write("finding", stage="sanitizer", family=self.family, **self.current)
            say(f"  sanitizer {self.family}: {self.current['category']} finding in "
                f"{self.current['case']!r}: {self.current['text'][:120]}")
            self.current = None

    def exit(self, state, rc) -> None:
        self.flush()
        self.ctx.results.write("sanitizer_process", stage="sanitizer", family=self.family, rc=rc,
                               error_summary=self.summaries[-1] if self.summaries else None)


def find_sanitizer() -> str | None:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                      "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Summary maths
# ---------------------------------------------------------------------------------------------------------------------

def limit_kind(row: dict) -> str | None:
    """What a bench row is held against: "bandwidth" (it counts bytes: GEMV, cache, dllm, bitpack, decode),
    "compute" (only FLOPs: attention), or None."""
    if row.get("bytes_moved"):
        return "bandwidth"
    if row.get("flops"):
        return "compute"
    return None


def fraction_of_limits(row: dict, limits: dict) -> dict:
    """{"limit": kind, "fraction_spec": x, "fraction_measured": y}: the row's GB/s over HBM bandwidth or TFLOP/s over
    the bf16 tensor-core rate, against the datasheet figure and the measured one (`limits`, H200's keys)."""
    kind = limit_kind(row)
    ms = row.get("ours_ms") or 0.0
    if kind is None or not ms or not math.isfinite(ms) or ms <= 0:
        return {"limit": kind, "fraction_spec": None, "fraction_measured": None}
    if kind == "bandwidth":
        gbps = row["bytes_moved"] / (ms * 1e-3) / 1e9
        spec, measured = limits["hbm_gbps_spec"], limits["hbm_gbps_measured"]
        value = gbps
    else:
        value = row["flops"] / (ms * 1e-3) / 1e12
        spec, measured = limits["bf16_tflops_spec"], limits["bf16_tflops_measured"]
    return {"limit": kind, "fraction_spec": value / spec, "fraction_measured": value / measured}


def enrich_bench_row(row: dict, limits: dict) -> dict:
    return {**row, **fraction_of_limits(row, limits)}


FAILED = ("failed", "error", "timeout", "crashed")


def merge_items(records: list[dict], kind: str) -> dict:
    """{(family, item): record}: the last record of each item, where a later "not_run" never hides an earlier
    result (merging a first run with a rerun)."""
    out: dict = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        key = (r.get("family"), r.get("item"))
        if r.get("outcome") == "not_run" and key in out:
            continue
        out[key] = r
    return out


def summarize(records: list[dict]) -> dict:
    """The summary of a run's records (or of several runs' records, merged): stages, per-kernel rows, per-family
    test counts, bench rows with their fractions of the H200 limits, failures, findings, and a --only for what is
    left."""
    run = next((r for r in records if r.get("kind") == "run"), {})
    device = run.get("device", "cuda")
    suffix = "." + ("cuda" if device.startswith("cuda") else device)
    info = next((r for r in reversed(records) if r.get("kind") == "build_info"), {})
    kernels = {k: fam for k, fam in (info.get("kernel_counters") or {}).items() if k.endswith(suffix)}
    tests = merge_items(records, "test")
    cases = merge_items(records, "case")
    bench_items = merge_items(records, "bench_item")
    findings = [r for r in records if r.get("kind") == "finding"]
    sanitizer_runs = [r for r in records if r.get("kind") == "sanitizer_tool"]
    sanitizer_on = any(r.get("available") for r in sanitizer_runs)
    for rec in list(tests.values()) + list(cases.values()) + list(bench_items.values()):
        for k in rec.get("kernels") or {}:
            kernels.setdefault(k, rec.get("family"))

    limits = dict(H200)
    for r in records:
        if r.get("kind") == "bench" and r.get("family") == "limits" and r.get("ours_ms"):
            if r.get("bytes_moved"):
                limits["hbm_gbps_measured"] = r["bytes_moved"] / (r["ours_ms"] * 1e-3) / 1e9
                limits["measured_in_run"] = True
            elif r.get("flops"):
                limits["bf16_tflops_measured"] = r["flops"] / (r["ours_ms"] * 1e-3) / 1e12
                limits["measured_in_run"] = True

    touched = {r.get("family") for r in records if r.get("kind") in ("collected", "test", "case", "bench_item",
                                                                     "job_not_run", "job_error")}
    touched |= {r.get("family") for r in records if r.get("kind") == "bench"}
    if touched & set(FAMILIES):
        kernels = {k: fam for k, fam in kernels.items() if fam in touched}
    per_kernel = {}
    for key in sorted(kernels, key=lambda k: (FAMILIES.index(kernels[k]) if kernels[k] in FAMILIES else 99, k)):
        t = [r for r in tests.values() if key in (r.get("kernels") or {})]
        c = [r for r in cases.values() if key in (r.get("kernels") or {})]
        b = [r for r in bench_items.values() if key in (r.get("kernels") or {})]
        bad_cases = {r.get("item") for r in c}
        dirty = [f for f in findings if f.get("category") == "memory" and f.get("family") == kernels[key]
                 and f.get("case") in bad_cases]
        if dirty:
            sanitizer = f"{len(dirty)} finding(s)"
        elif not c:
            sanitizer = "not run"
        elif any(r.get("outcome") != "ok" for r in c):
            sanitizer = "case error"
        elif sanitizer_on and _sanitizer_completed(records, kernels[key]):
            sanitizer = "clean"
        else:
            sanitizer = "ran bare" if not sanitizer_on else "incomplete"
        per_kernel[key] = {"family": kernels[key], "ran": bool(t or c or b), "tests": len(t),
                           "passed": sum(r["outcome"] == "passed" for r in t),
                           "failed": sum(r["outcome"] in FAILED for r in t), "sanitizer": sanitizer,
                           "path_ok": all(r.get("path_ok", True) for r in c), "bench_items": len(b)}

    per_family = {}
    for group in TEST_GROUPS:
        rs = [r for (fam, _), r in tests.items() if fam == group]
        if rs:
            counts = collections.Counter(r["outcome"] for r in rs)
            per_family[group] = {"tests": len(rs), **{k: counts.get(k, 0) for k in
                                                      ("passed", "failed", "error", "skipped", "timeout", "crashed",
                                                       "not_run")}}

    rows = [r for r in records if r.get("kind") == "bench"]
    bench = [{**r, **fraction_of_limits(r, limits)} for r in rows if r.get("family") != "limits"]

    stages = {}
    for r in records:
        if r.get("kind") == "stage_start":
            stages[r["stage"]] = {"status": "running", "budget_s": r.get("budget_s"), "allotted_s": r.get("allotted_s")}
        elif r.get("kind") == "stage_end":
            stages.setdefault(r["stage"], {}).update(status=r.get("status"), seconds=r.get("seconds"),
                                                     reason=r.get("reason", ""))

    rerun = []
    for (fam, _), r in tests.items():
        if r["outcome"] in ("timeout", "crashed", "not_run") and f"tests:{fam}" not in rerun:
            rerun.append(f"tests:{fam}")
    for (fam, _), r in cases.items():
        if r["outcome"] in ("timeout", "crashed", "not_run") and f"sanitizer:{fam}" not in rerun:
            rerun.append(f"sanitizer:{fam}")
    for (_, item), r in bench_items.items():
        if r["outcome"] in ("timeout", "crashed", "not_run") and f"bench:{item}" not in rerun:
            rerun.append(f"bench:{item}")
    for r in records:
        if r.get("kind") in ("job_not_run", "job_error"):
            what = r["stage"] if r.get("family") in (None, "bench") else f"{r['stage']}:{r['family']}"
            if what not in rerun:
                rerun.append(what)
    for stage, s in stages.items():
        if s.get("status") in ("skipped", "running") and stage != "build" and \
                not any(x.startswith(stage) for x in rerun):
            rerun.append(stage)

    failures = [{"family": r.get("family"), "item": r.get("item"), "outcome": r["outcome"],
                 "message": _last_line(r.get("message", ""))} for r in tests.values() if r["outcome"] in FAILED]
    failures += [{"family": r.get("family"), "item": f"sanitizer case: {r.get('item')}",
                  "outcome": r["outcome"] if r["outcome"] in FAILED else "other-path",
                  "message": _last_line(r.get("message", "")) if r["outcome"] in FAILED else
                  f"expected {r.get('expected')}, ran {sorted(r.get('kernels') or {})}"}
                 for r in cases.values() if r["outcome"] in FAILED or r.get("path_ok") is False]
    failures += [{"family": r.get("family"), "item": f"bench item: {r.get('item')}", "outcome": r["outcome"],
                  "message": _last_line(r.get("message", ""))} for r in bench_items.values()
                 if r["outcome"] in FAILED]
    machine = next((r for r in reversed(records) if r.get("kind") == "machine"), {})
    build = next((r for r in reversed(records) if r.get("kind") == "build"), {})
    return {"dry_run": run.get("dry_run", False), "device": device, "machine": machine.get("name", ""),
            "arch": machine.get("arch", ""), "elapsed_s": max((r.get("t", 0) for r in records), default=0),
            "deadline_s": run.get("deadline_s"), "stages": stages, "kernels": per_kernel, "families": per_family,
            "bench": bench, "limits": limits, "failures": failures,
            "findings": [{k: f.get(k) for k in ("family", "case", "category", "text", "where")} for f in findings],
            "sanitizer_available": sanitizer_on, "rerun": ",".join(rerun),
            "build_error": tail_text(build.get("log_tail") or "", 1500) if build.get("status") not in (None, "ok")
            else ""}


def _sanitizer_completed(records, family) -> bool:
    return any(r.get("kind") == "sanitizer_process" and r.get("family") == family and r.get("error_summary")
               is not None for r in records)


def _last_line(message: str) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    """The summary table printed last (the end of the device tool's output)."""
    out = []
    title = "gpu_check summary" + (" -- DRY RUN on the CPU kernels: no GPU figures" if s["dry_run"] else "")
    out.append(f"== {title}: {' '.join(filter(None, (s['machine'] or s['device'], s['arch'])))}, "
               f"{s['elapsed_s']:.0f} s"
               + (f" of {s['deadline_s']:.0f}" if s.get("deadline_s") else ""))
    out.append(_table(["stage", "status", "seconds", "budget", "allotted"],
                      [[k, v.get("status", "-"), _num(v.get("seconds")), _num(v.get("budget_s")),
                        _num(v.get("allotted_s"))] for k, v in s["stages"].items()]))
    if s.get("build_error"):
        out.append("build failed; the end of build.log:")
        out.append(s["build_error"])
    if s["families"]:
        cols = ["tests", "passed", "failed", "error", "skipped", "timeout", "crashed", "not_run"]
        out.append("")
        out.append(_table(["test group"] + cols,
                          [[fam] + [v[c] for c in cols] for fam, v in s["families"].items()]))
    if s["kernels"]:
        out.append("")
        out.append(_table(["kernel", "family", "ran", "tests pass/fail", "sanitizer", "path", "bench"],
                          [[k, v["family"], "yes" if v["ran"] else "NO",
                            f"{v['passed']}/{v['failed']} of {v['tests']}" if v["tests"] else "-",
                            v["sanitizer"], "ok" if v["path_ok"] else "OTHER", v["bench_items"] or "-"]
                           for k, v in s["kernels"].items()]))
    if s["bench"]:
        lim = s["limits"]
        out.append("")
        out.append(f"bench vs H200 limits: HBM {lim['hbm_gbps_spec'] / 1e3:.1f} TB/s spec / "
                   f"{lim['hbm_gbps_measured'] / 1e3:.2f} measured, bf16 tensor cores {lim['bf16_tflops_spec']:.0f} "
                   f"TFLOP/s spec / {lim['bf16_tflops_measured']:.0f} measured "
                   f"({'in this run' if lim.get('measured_in_run') else 'KINDS.md figures'})")
        rows = []
        for r in s["bench"]:
            rate = _rate(r)
            goal = r.get("goal")
            rows.append([_short(r.get("family"), 10), _short(r.get("op"), 28), _short(r.get("shape"), 30),
                         _num(r.get("ours_ms"), 3), _short(r.get("baseline"), 22),
                         f"{r.get('speedup', float('nan')):.2f}x", rate,
                         f"{_pct(r.get('fraction_measured'))} {_pct(r.get('fraction_spec'))}",
                         "ok" if r.get("ok") else "FAIL",
                         "-" if not goal else ("met " if goal["met"] else "MISSED ") + goal["text"]])
        out.append(_table(["family", "op", "shape", "ms", "baseline", "speedup", "rate", "%meas %spec", "err",
                           "goal"], rows[:36]))
        if len(rows) > 36:
            out.append(f"... {len(rows) - 36} more rows in bench.log")
    if s["failures"]:
        out.append("")
        out.append(f"failures ({len(s['failures'])}; first 10, messages in results.jsonl):")
        for f in s["failures"][:10]:
            item = str(f["item"]).replace("tests/", "", 1)
            item = item if len(item) <= 72 else "~" + item[-71:]
            out.append(f"  {f['outcome'].upper()} [{f['family']}] {item}"
                       + (f": {_short(f['message'], 60)}" if f["message"] else ""))
    if s["findings"]:
        out.append(f"sanitizer findings ({len(s['findings'])}; first 6, details in results.jsonl):")
        for f in s["findings"][:6]:
            out.append(f"  [{f['family']}] {f['category']} in {_short(f['case'], 40)!r}: {_short(f['text'], 50)}"
                       + (f" at {_short(f['where'], 50)}" if f.get("where") else ""))
    if not s["sanitizer_available"]:
        out.append("compute-sanitizer: not available in this run (cases ran without memcheck)")
    out.append(f"rerun what is left: {('--only ' + s['rerun']) if s['rerun'] else 'nothing'}")
    return "\n".join(out)


def _rate(row: dict) -> str:
    ms = row.get("ours_ms") or 0.0
    if not ms or not math.isfinite(ms):
        return "-"
    if row.get("limit") == "bandwidth" or (row.get("bytes_moved") and not row.get("limit")):
        return f"{row['bytes_moved'] / (ms * 1e-3) / 1e9:.0f} GB/s"
    if row.get("flops"):
        return f"{row['flops'] / (ms * 1e-3) / 1e12:.1f} TF/s"
    return "-"


def _num(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else "nan"
    return str(x)


def _short(text, n) -> str:
    text = str(text or "")
    for long, short in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
        text = text.replace(long, short)
    return text if len(text) <= n else text[:n - 1] + "~"


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------

PROBE = r"""
import json, os, torch
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
     "cpus": os.cpu_count()}
if d["available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(d))
"""


class Context:
    def __init__(self, args, results: Results, out: str):
        self.args, self.results, self.out = args, results, out
        self.device = args.device
        self.cuda = args.device.startswith("cuda")
        self.python = sys.executable
        self.limits = dict(H200)
        self._restarts = collections.Counter()
        self._lock = threading.Lock()
        self.lock = threading.Lock()
        self.arch = ""
        self.cpus = os.cpu_count() or 1

    def restarts_left(self, job) -> int:
        with self._lock:
            self._restarts[(job.stage, job.family)] += 1
            return MAX_RESTARTS - self._restarts[(job.stage, job.family)]

    def update_limits(self, row: dict) -> None:
        ms = row.get("ours_ms")
        if not ms or not math.isfinite(ms):
            return
        if row.get("bytes_moved"):
            self.limits["hbm_gbps_measured"] = row["bytes_moved"] / (ms * 1e-3) / 1e9
        elif row.get("flops"):
            self.limits["bf16_tflops_measured"] = row["flops"] / (ms * 1e-3) / 1e12

    def child_env(self, threads: int | None = None, **extra) -> dict:
        env = dict(os.environ)
        paths = [os.path.join(ROOT, "python"), BENCH_DIR] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
        env.update(PYTHONPATH=":".join(paths), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_COMPILE_THREADS=str(threads))
        env.update(extra)
        return env


def build_command(python: str) -> list[str]:
    """The build: setup.py's CMake build in place (what `pip install --no-build-isolation --no-deps -e .` runs,
    without pip's packaging steps); the extension lands in python/blockops/, which the children's PYTHONPATH holds."""
    return [python, "setup.py", "build_ext", "--inplace"]


# The host compiler of the build. The H200 image's default C++ compiler (/opt/gcc, chosen through its environment)
# links libstdc++ statically, and such an extension segfaulted on its first error message beside torch's shared
# libstdc++ (2026-12-04; CMakeLists.txt now refuses such a link): the system compiler is used where there is one.
# GPU_CHECK_CXX overrides it; an empty GPU_CHECK_CXX keeps the environment's.
SYSTEM_CXX = "/usr/bin/g++"


def host_compiler() -> str | None:
    chosen = os.environ.get("GPU_CHECK_CXX", SYSTEM_CXX if os.access(SYSTEM_CXX, os.X_OK) else "")
    return chosen or None


def build_env(arch: str, jobs: int) -> dict:
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs))
    cxx = host_compiler()
    if cxx:
        env.update(CXX=cxx, CUDAHOSTCXX=cxx)
    return env


def run_build(ctx: Context, end: float) -> str:
    log_path = os.path.join(ctx.out, "build.log")
    cmd = build_command(ctx.python)
    env = build_env(ctx.arch, ctx.cpus)
    with open(log_path, "a", buffering=1) as log:
        log.write(f"$ TORCH_CUDA_ARCH_LIST={ctx.arch} MAX_JOBS={ctx.cpus} CXX={env.get('CXX', '')} {' '.join(cmd)}\n")
        log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with _live_lock:
            _live.add(proc)
        try:
            rc = proc.wait(timeout=max(1.0, end - time.monotonic()))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, status = None, "timeout"
        finally:
            with _live_lock:
                _live.discard(proc)
        seconds = time.monotonic() - t0
    tail = tail_text(open(log_path, errors="replace").read(), 3000)
    ctx.results.write("build", stage="build", status=status, rc=rc, seconds=round(seconds, 1), arch=ctx.arch,
                      jobs=ctx.cpus, cxx=env.get("CXX"), command=" ".join(cmd), log_tail=tail if status != "ok" else "")
    say(f"  build: {status} in {seconds:.0f} s (TORCH_CUDA_ARCH_LIST={ctx.arch}, MAX_JOBS={ctx.cpus})")
    return status


def record_build_info(ctx: Context) -> bool:
    try:
        res = subprocess.run([ctx.python, "-m", "blockops", "info"], cwd=ROOT, env=ctx.child_env(),
                             capture_output=True, text=True, timeout=120)
        info = json.loads(res.stdout)
    except (subprocess.TimeoutExpired, ValueError) as e:
        ctx.results.write("build_info", error=f"python -m blockops info failed: {e}")
        return False
    ctx.results.write("build_info", **build_info_fields(info))
    return True


def build_info_fields(info: dict) -> dict:
    """The parts of blockops.build_info() a run records."""
    keep = ("version", "torch_version", "cuda_version", "cuda_compiled", "cuda_families", "cuda_requested_archs",
            "cuda_ptx", "cutlass_include", "cpu_isa_path", "kernel_counters", "ops")
    return {k: info.get(k) for k in keep}


def pytest_command(ctx: Context, group: str) -> callable:
    if group == "other":
        mapped = {f for files in TEST_FILES.values() for f in files}
        files = sorted(f for f in os.listdir(os.path.join(ROOT, "tests"))
                       if f.startswith("test_") and f.endswith(".py") and f not in mapped)
    else:
        files = TEST_FILES[group]
    paths = [os.path.join("tests", f) for f in files if os.path.exists(os.path.join(ROOT, "tests", f))]

    def command(skip_path):
        cmd = [ctx.python, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
               "--continue-on-collection-errors",
               "-p", "gpu_check_pytest", "--gpu-check-device", "cuda" if ctx.cuda else "cpu",
               "--gpu-check-skip", skip_path, "--gpu-check-always", ",".join(ALWAYS_TESTS)]
        if ctx.args.tests_k:
            cmd += ["-k", ctx.args.tests_k]
        return cmd + paths
    return command


def run_parallel(jobs: list[Job], end: float, workers: int) -> str:
    statuses = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for status in pool.map(lambda j: j.run(end), jobs):
            statuses.append(status)
    return "timeout" if "timeout" in statuses else "error" if "error" in statuses else "ok"


def run_tests(ctx: Context, end: float) -> str:
    groups = [g for g in TEST_GROUPS if selected("tests", g, ctx.only, ctx.skip)]
    log = Log(os.path.join(ctx.out, "tests.log"))
    workers = ctx.args.jobs
    threads = max(1, ctx.cpus // max(1, workers))
    extra = {"BLOCKOPS_EXPECT_CUDA_ARCHS": ctx.arch} if ctx.cuda and ctx.arch else {}
    jobs = [Job(ctx, "tests", g, pytest_command(ctx, g), ctx.child_env(threads, **extra), log,
                ctx.item_timeouts["tests"]) for g in groups]
    return run_parallel(jobs, end, workers)


def run_sanitizer(ctx: Context, end: float) -> str:
    families = [f for f in FAMILIES if selected("sanitizer", f, ctx.only, ctx.skip)]
    log = Log(os.path.join(ctx.out, "sanitizer.log"))
    tool = None if (ctx.args.dry_run or not ctx.cuda) else find_sanitizer()
    reason = ("dry run: the CPU kernels run the cases without compute-sanitizer" if ctx.args.dry_run or not ctx.cuda
              else "" if tool else "compute-sanitizer not found: the cases run without it")
    ctx.results.write("sanitizer_tool", stage="sanitizer", available=tool is not None, path=tool, reason=reason)
    if reason:
        say(f"  sanitizer: {reason}")
    workers = ctx.args.jobs
    threads = max(1, ctx.cpus // max(1, workers))
    jobs = []
    for family in families:
        def command(skip_path, family=family):
            worker = [ctx.python, os.path.join(BENCH_DIR, "gpu_check_worker.py"), "sanitizer", "--family", family,
                      "--device", ctx.device, "--skip", skip_path]
            if tool is None:
                return worker
            return [tool, "--tool", "memcheck", "--print-limit", "50", "--error-exitcode", "9", *worker]
        parser = SanitizerParser(ctx, family)
        env = ctx.child_env(threads, **({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool else {}))
        jobs.append(Job(ctx, "sanitizer", family, command, env, log, ctx.item_timeouts["sanitizer"],
                        on_line=parser.line, on_exit=parser.exit))
    return run_parallel(jobs, end, workers)


def run_bench(ctx: Context, end: float) -> str:
    items = [i for i in BENCH_ITEM_IDS if i == "limits" or bench_selected(i, ctx.only, ctx.skip)]
    if items == ["limits"]:
        items = []
    log = Log(os.path.join(ctx.out, "bench.log"))

    def command(skip_path):
        cmd = [ctx.python, os.path.join(BENCH_DIR, "gpu_check_worker.py"), "bench", "--items", ",".join(items),
               "--device", ctx.device, "--skip", skip_path]
        return cmd + (["--tiny", "--smoke"] if ctx.args.dry_run else [])

    if not items:
        return "ok"
    job = Job(ctx, "bench", "bench", command, ctx.child_env(), log, ctx.item_timeouts["bench"])
    return job.run(end)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (created; results.jsonl is appended to)")
    parser.add_argument("--only", help="stages to run: STAGE or STAGE:FAMILY (bench also STAGE:ITEM), comma-separated")
    parser.add_argument("--skip", help="stages or STAGE:FAMILY to leave out, same form")
    parser.add_argument("--no-build", action="store_true", help="use the extension already built")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on the CPU kernels with small budgets: no build, no compute-sanitizer")
    parser.add_argument("--device", help="cuda (default) or cpu (default with --dry-run)")
    parser.add_argument("--deadline", type=float, help=f"seconds from --t0 by which the run ends (default {DEADLINE}; "
                                                       f"dry run {DRY_DEADLINE})")
    parser.add_argument("--budget", action="append", default=[], help="STAGE=SECONDS[,STAGE=SECONDS...]")
    parser.add_argument("--timeout", action="append", default=[],
                        help="per-item timeout STAGE=SECONDS (a test, a sanitizer case, a bench item)")
    parser.add_argument("--jobs", type=int, help="families run at once in the tests and sanitizer stages "
                                                 "(default 4 on a GPU, 1 in a dry run)")
    parser.add_argument("--tests-k", help="pytest -k expression for the tests stage")
    parser.add_argument("--t0", type=float, help="the run's start (Unix time; bench/gpu_check.sh passes its own)")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="print the summary of these results files")
    args = parser.parse_args(argv)

    if args.summarize:
        records = []
        for path in args.summarize:
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
        print(format_summary(summarize(records)))
        return 0
    if not args.out:
        parser.error("--out is required")
    try:
        args.only_sel = parse_selection(args.only, BENCH_ITEM_IDS)
        args.skip_sel = parse_selection(args.skip, BENCH_ITEM_IDS)
        budgets = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
        budgets.update(_pairs(args.budget, STAGES))
        item_timeouts = dict(DRY_ITEM_TIMEOUTS if args.dry_run else ITEM_TIMEOUTS)
        item_timeouts.update(_pairs(args.timeout, ("tests", "sanitizer", "bench")))
    except ValueError as e:
        parser.error(str(e))
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.jobs = args.jobs or (1 if args.dry_run or not args.device.startswith("cuda") else 4)
    t0 = args.t0 or time.time()
    deadline_s = args.deadline or (DRY_DEADLINE if args.dry_run else DEADLINE)
    mono0 = time.monotonic() - (time.time() - t0)        # the monotonic clock at t0
    deadline = mono0 + deadline_s

    os.makedirs(args.out, exist_ok=True)
    results = Results(os.path.join(args.out, "results.jsonl"), t0)
    ctx = Context(args, results, args.out)
    ctx.only, ctx.skip, ctx.item_timeouts = args.only_sel, args.skip_sel, item_timeouts
    checks = [s for s, whats in (("tests", TEST_GROUPS), ("sanitizer", FAMILIES))
              if any(selected(s, w, ctx.only, ctx.skip) for w in whats)]
    if any(bench_selected(i, ctx.only, ctx.skip) for i in BENCH_ITEM_IDS[1:]):
        checks.append("bench")
    want_build = (bool(checks) or "build" in ctx.only) and "build" not in ctx.skip
    no_build = args.no_build or args.dry_run
    stages = (["build"] if want_build and not no_build else []) + checks
    available = deadline - time.monotonic() - SUMMARY_RESERVE
    budgets = {**budgets, **scale_budgets(budgets, stages, available)}
    results.write("run", argv=sys.argv[1:] if argv is None else argv, dry_run=args.dry_run, device=args.device,
                  deadline_s=deadline_s, stages=stages, budgets={s: round(budgets[s], 1) for s in stages},
                  item_timeouts=item_timeouts, jobs=args.jobs, only=args.only, skip=args.skip)
    if want_build and no_build:
        results.write("stage_end", stage="build", status="skipped", seconds=0,
                      reason="dry run: the extension already built" if args.dry_run else "--no-build")

    def on_term(signum, frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    exit_code = 0
    try:
        exit_code = _run_stages(ctx, stages, budgets, deadline)
    except SystemExit as e:
        results.write("interrupted", reason=str(e))
        exit_code = 3
    except Exception:  # noqa: BLE001 - a bug here must not cost the results so far: record it, summarize
        import traceback

        results.write("internal_error", message=tail_text(traceback.format_exc(), 4000))
        say(traceback.format_exc())
        exit_code = 4
    finally:
        with _live_lock:
            for proc in list(_live):
                kill_group(proc, grace=0.5)
        summary = summarize(results.records)
        text = format_summary(summary)
        results.write("summary", **summary)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(text + "\n")
        results.close()
        print("\n" + text, flush=True)
    return exit_code


def _pairs(values: list[str], known) -> dict:
    out = {}
    for value in values:
        for pair in filter(None, value.split(",")):
            key, _, seconds = pair.partition("=")
            if key not in known or not seconds:
                raise ValueError(f"expected STAGE=SECONDS with STAGE in {', '.join(known)}, got {pair!r}")
            out[key] = float(seconds)
    return out


def _run_stages(ctx: Context, stages: list[str], budgets: dict, deadline: float) -> int:
    args = ctx.args
    say(f"gpu_check: stages {', '.join(stages) or 'none'}; deadline {deadline - time.monotonic():.0f} s from now"
        + (" (DRY RUN on the CPU)" if args.dry_run else ""))
    if ctx.cuda:
        probe = subprocess.run([ctx.python, "-c", PROBE], capture_output=True, text=True, timeout=120,
                               env=ctx.child_env())
        try:
            machine = json.loads(probe.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            machine = {"error": tail_text(probe.stderr, 2000)}
    else:       # the children report torch's version; no torch import here (seconds on a small CPU)
        machine = {"available": False}
    if ctx.cuda and not machine.get("available"):
        ctx.results.write("machine", **machine)
        say("gpu_check: no CUDA device visible to torch; run this on a GPU machine (or use --dry-run)")
        return 2
    if ctx.cuda:
        major, minor = machine["capability"]
        ctx.arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{major}.{minor}" + ("a" if major >= 9 else "")
        machine["arch"] = ctx.arch
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            machine["nvidia_smi"] = q.stdout.strip()
    else:
        machine.setdefault("name", "CPU (dry run)" if args.dry_run else "CPU")
    machine["cpus"] = ctx.cpus
    ctx.results.write("machine", **machine)

    have_extension = True
    for index, stage in enumerate(stages):
        now = time.monotonic()
        end = stage_end(now, deadline, [budgets[s] for s in stages[index + 1:]])
        ctx.results.write("stage_start", stage=stage, budget_s=round(budgets[stage], 1), allotted_s=round(end - now, 1))
        if end - now < MIN_STAGE_SECONDS:
            ctx.results.write("stage_end", stage=stage, status="skipped", seconds=0, reason="no time left")
            say(f"== {stage}: skipped (no time left)")
            continue
        if stage != "build" and not have_extension:
            ctx.results.write("stage_end", stage=stage, status="skipped", seconds=0,
                              reason="no extension: the build failed")
            say(f"== {stage}: skipped (the build failed)")
            continue
        say(f"== {stage}: up to {end - now:.0f} s (budget {budgets[stage]:.0f} s)")
        if stage == "build":
            status = run_build(ctx, end)
            have_extension = status == "ok" and record_build_info(ctx)
        else:
            status = {"tests": run_tests, "sanitizer": run_sanitizer, "bench": run_bench}[stage](ctx, end)
        seconds = time.monotonic() - now
        ctx.results.write("stage_end", stage=stage, status=status, seconds=round(seconds, 1))
        say(f"== {stage}: {status} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, BENCH_DIR)
    sys.exit(main())
