"""pytest plugin of bench/gpu_check.py (``-p gpu_check_pytest``, bench/ on PYTHONPATH; independent of any conftest):
keeps the CUDA cases only (or, with ``--gpu-check-device cpu``, their CPU twins: the dry run), drops the tests already
done (``--gpu-check-skip FILE``), moves torch.compile tests last, and reports every test on gpu_check's record pipe:
``items`` after collection, then ``start`` and ``end`` per test (outcome, seconds, the kernel counters that moved,
the failure's text). A failed CUDA test after which the CUDA context no longer works (an illegal address, a
device-side assert) ends the process with gpu_check.EXIT_CONTEXT_LOST; gpu_check.py starts a fresh pytest for the
tests left. Timeouts are gpu_check.py's: it kills a test that outlives its timeout and restarts after it.

A test is a CUDA case when one of its parameters is the device "cuda" (tests/helpers.DEVICES) or it carries a
skipif whose reason says it needs a CUDA device; the tests named by ``--gpu-check-always`` (``file.py::name``) run
too.
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

_NEEDS_CUDA = re.compile(r"(no|needs a) CUDA device", re.IGNORECASE)


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--gpu-check-device", default="cuda", choices=("cuda", "cpu"),
                    help="keep the tests of this device (cpu: the CPU twins of the CUDA cases)")
    group.addoption("--gpu-check-skip", default=None, help="JSON file: node ids already done")
    group.addoption("--gpu-check-always", default="",
                    help="comma-separated FILE.py::TEST names that run whatever their device")


def device_of(item) -> str | None:
    """"cuda" or "cpu" for a device-parametrized test, "cuda" for one that skips without a CUDA device, else None."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for value in callspec.params.values():
            kind = getattr(value, "type", value)       # a torch.device or a string
            if isinstance(kind, str) and kind.split(":")[0] in ("cuda", "cpu"):
                return kind.split(":")[0]
    for mark in item.iter_markers("skipif"):
        if _NEEDS_CUDA.search(str(mark.kwargs.get("reason", ""))):
            return "cuda"
    return None


def _is_compile_test(item) -> bool:
    return "compile" in item.name


class _Reporter:
    def __init__(self, config):
        self.config = config
        self.device = config.getoption("--gpu-check-device")
        self.reports: dict[str, list] = {}
        self.counters = None

    def kernel_counts(self) -> dict:
        if self.counters is None:
            try:
                import blockops

                self.counters = blockops.kernel_call_counts
            except Exception:  # noqa: BLE001 - no library: no counters, the tests say why
                self.counters = dict
        return {k: v for k, v in self.counters().items() if k.endswith("." + self.device)}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        skip_path = config.getoption("--gpu-check-skip")
        done = set()
        if skip_path:
            import json

            with open(skip_path) as f:
                done = set(json.load(f))
        always = {name for name in config.getoption("--gpu-check-always").split(",") if name}
        keep, drop = [], []
        for item in items:
            wanted = device_of(item) == self.device or item.nodeid.split("/")[-1].split("[")[0] in always
            (keep if wanted and item.nodeid not in done else drop).append(item)
        keep.sort(key=_is_compile_test)      # stable: torch.compile tests (slow to compile) last
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
        gpu_check.emit(kind="items", items=[item.nodeid for item in keep])
        try:
            import blockops

            gpu_check.emit(kind="build_info", **gpu_check.build_info_fields(blockops.build_info()))
        except Exception:  # noqa: BLE001 - no library: the tests say why
            pass

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        gpu_check.emit(kind="start", item=item.nodeid)
        before = self.kernel_counts()
        self.reports[item.nodeid] = []
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        after = self.kernel_counts()
        kernels = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        outcome, message = self._outcome(self.reports.pop(item.nodeid, []))
        gpu_check.emit(kind="end", item=item.nodeid, outcome=outcome, seconds=round(seconds, 3), kernels=kernels,
                       message=message)
        if outcome in ("failed", "error") and self.device == "cuda" and not self._context_works(message):
            gpu_check.emit(kind="context_lost", item=item.nodeid)
            sys.stdout.flush()
            os._exit(gpu_check.EXIT_CONTEXT_LOST)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item):
        gpu_check.planted_fault("tests", item.nodeid)

    def pytest_collectreport(self, report):
        if report.failed:
            gpu_check.emit(kind="collect_error", item=report.nodeid,
                           message=gpu_check.tail_text(report.longreprtext, 4000))

    def pytest_runtest_logreport(self, report):
        self.reports.setdefault(report.nodeid, []).append(report)

    @staticmethod
    def _outcome(reports) -> tuple[str, str]:
        outcome, message = "passed", ""
        for r in reports:
            if r.failed:
                outcome = "failed" if r.when == "call" else "error"
                message = gpu_check.tail_text(r.longreprtext, 4000)
                break
            if r.skipped:
                outcome = "skipped"
                longrepr = r.longrepr
                message = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        return outcome, message

    @staticmethod
    def _context_works(message: str) -> bool:
        if gpu_check.STICKY_CUDA_ERRORS.search(message or ""):
            return False
        try:
            import torch

            torch.cuda.synchronize()
            return (torch.ones(4, device="cuda") + 1).sum().item() == 8.0
        except Exception:  # noqa: BLE001 - any error here means the context is gone
            return False


def pytest_configure(config):
    config.pluginmanager.register(_Reporter(config), "gpu_check_reporter")
