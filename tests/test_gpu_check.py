"""bench/gpu_check.py, the GPU check, without a GPU: its selection, budget and summary maths, the compute-sanitizer
report parser, the worker's tables (a sanitizer case for every CUDA kernel path, the bench items), every sanitizer case
and bench item on the CPU kernels, and one dry run end to end (--dry-run: the same stages on the CPU) with planted
faults: a failing test that does not stop the others, a hung test whose stage is cut at its end time while the later
stages still run, a hung sanitizer case killed at its timeout and a crashed bench item, each followed by a restart
for the items left; results stream to results.jsonl while the run goes on and the summary has per-kernel rows."""
import json
import os
import subprocess
import sys
import time

import pytest

import blockops
import blockops.bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import gpu_check_worker  # noqa: E402


def test_selection():
    sel = gpu_check.parse_selection("tests:lowbit,bench:attention,sanitizer,tests:vq", gpu_check.BENCH_ITEM_IDS)
    assert sel == {"tests": {"lowbit", "vq"}, "bench": {"attention"}, "sanitizer": None}
    assert gpu_check.parse_selection(None) == {}
    assert gpu_check.parse_selection("bench:vq:4096x11008:M1", gpu_check.BENCH_ITEM_IDS) == \
        {"bench": {"vq:4096x11008:M1"}}
    assert gpu_check.parse_selection("bench:vq,bench", gpu_check.BENCH_ITEM_IDS) == {"bench": None}
    for bad in ("test:lowbit", "tests:nope", "sanitizer:other"):
        with pytest.raises(ValueError, match="unknown"):
            gpu_check.parse_selection(bad, gpu_check.BENCH_ITEM_IDS)
    only, skip = sel, gpu_check.parse_selection("sanitizer:vq")
    assert gpu_check.selected("tests", "lowbit", only, skip) and not gpu_check.selected("tests", "dllm", only, skip)
    assert gpu_check.selected("sanitizer", "dllm", only, skip) and not gpu_check.selected("sanitizer", "vq", only, skip)
    assert gpu_check.selected("tests", "other", {}, {}) and not gpu_check.selected("bench", "x", {"tests": None}, {})
    assert gpu_check.bench_selected("attention:longgen", only, {})
    assert not gpu_check.bench_selected("lowbit:4096x14336:M1", only, {})
    assert gpu_check.bench_selected("lowbit:4096x14336:M1", {}, {})
    assert not gpu_check.bench_selected("lowbit:4096x14336:M1", {}, gpu_check.parse_selection("bench:lowbit"))


def test_budgets_fit_and_later_stages_keep_theirs():
    b = gpu_check.BUDGETS
    assert sum(b.values()) + gpu_check.SUMMARY_RESERVE <= gpu_check.DEADLINE <= 540      # 9 minutes, one command
    stages = list(gpu_check.STAGES)
    assert gpu_check.scale_budgets(b, stages, 1000) == {s: b[s] for s in stages}
    half = gpu_check.scale_budgets(b, stages, sum(b.values()) / 2)
    assert all(abs(half[s] - b[s] / 2) < 1e-9 for s in stages)
    # A stage ends at the deadline minus the summary's reserve and the later stages' budgets, whatever the earlier
    # stages left: the slack of a quick build goes to the tests, never the bench's own time to the tests.
    assert gpu_check.stage_end(100.0, 540.0, [80, 110], reserve=8) == 540 - 8 - 190
    assert gpu_check.stage_end(100.0, 540.0, [], reserve=8) == 532
    assert gpu_check.stage_end(500.0, 540.0, [80, 110], reserve=8) == 500.0          # no time: ends at once


def test_fraction_of_h200_limits():
    limits = dict(gpu_check.H200)
    assert limits["hbm_gbps_spec"] == 4800 and limits["bf16_tflops_spec"] == 989
    # 4.3 GB in a millisecond: the measured copy bandwidth exactly, 4.3 / 4.8 of the datasheet's.
    gemv = {"ours_ms": 1.0, "bytes_moved": 4.3e12 * 1e-3, "flops": 1e9}
    f = gpu_check.fraction_of_limits(gemv, limits)
    assert f["limit"] == "bandwidth"             # bytes counted: held against HBM even with FLOPs counted too
    assert f["fraction_measured"] == pytest.approx(1.0) and f["fraction_spec"] == pytest.approx(4300 / 4800)
    attention = {"ours_ms": 2.0, "flops": 395e12 * 2e-3, "bytes_moved": 0.0}
    f = gpu_check.fraction_of_limits(attention, limits)
    assert f["limit"] == "compute"
    assert f["fraction_measured"] == pytest.approx(395 / 790) and f["fraction_spec"] == pytest.approx(395 / 989)
    assert gpu_check.fraction_of_limits({"ours_ms": 1.0}, limits)["fraction_spec"] is None
    assert gpu_check.fraction_of_limits({"ours_ms": float("nan"), "flops": 1.0}, limits)["fraction_spec"] is None


def test_emit_falls_back_to_stdout(monkeypatch, capsys):
    """A child whose record descriptor does not work (closed by a launcher in between) sends its records on stdout
    behind a prefix, which the parent's output reader takes as records."""
    read, write = os.pipe()
    os.close(read)
    os.close(write)         # a descriptor number that is not open
    monkeypatch.setenv("GPU_CHECK_FD", str(write))
    monkeypatch.setattr(gpu_check, "_emit_fd", [])
    gpu_check.emit(kind="start", item="a")
    out = capsys.readouterr().out
    assert out.startswith(gpu_check.RECORD_PREFIX) and json.loads(out[len(gpu_check.RECORD_PREFIX):]) == \
        {"kind": "start", "item": "a"}
    ctx = _Ctx()
    job = gpu_check.Job(ctx, "bench", "bench", None, {}, None, 10)
    state = {"in_flight": None, "tail": []}
    job._record(out[len(gpu_check.RECORD_PREFIX):].strip().encode(), state)
    assert state["in_flight"] == "a"


class _Results(list):
    def write(self, kind, **fields):
        self.append({"kind": kind, **fields})


class _Ctx:
    def __init__(self):
        self.results = _Results()


def test_sanitizer_parser():
    ctx = _Ctx()
    parser = gpu_check.SanitizerParser(ctx, "lowbit")
    state = {"in_flight": "quant_linear mma w2g64 M=24 fp16"}
    for line in ["========= COMPUTE-SANITIZER",
                 "========= Invalid __global__ write of size 4 bytes",
                 "=========     at void blockops::lowbit::quant_mma_kernel<2>(GemvParams)+0x1a0 in lowbit_mma.cu:321",
                 "=========     by thread (5,0,0) in block (0,3,0)",
                 "=========     Address 0x7f00 is out of bounds",
                 "=========",
                 "some output of the program",
                 "========= Program hit cudaErrorInvalidValue (error 1) due to \"invalid argument\" on CUDA API call "
                 "to cudaFuncSetAttribute."]:
        parser.line(line, state)
    state["in_flight"] = None
    parser.line("========= ERROR SUMMARY: 2 errors", state)
    parser.exit(state, 9)
    findings = [r for r in ctx.results if r["kind"] == "finding"]
    assert [f["category"] for f in findings] == ["memory", "api"]
    assert findings[0]["case"] == "quant_linear mma w2g64 M=24 fp16" and "quant_mma_kernel" in findings[0]["where"]
    assert len(findings[0]["details"]) == 3
    assert ctx.results[-1] == {"kind": "sanitizer_process", "stage": "sanitizer", "family": "lowbit", "rc": 9,
                               "error_summary": 2}


def _records():
    """A run of two families: lowbit (a test fails, a memcheck finding in the mma case, a bench row) and vq (one test
    not run at the deadline, sanitizer clean)."""
    info = {"kind": "build_info", "kernel_counters": {"quant_linear.cuda": "lowbit", "quant_linear_mma.cuda": "lowbit",
                                                      "quant_linear.cpu": "lowbit", "vq_linear.cuda": "vq",
                                                      "vq_dequantize.cuda": "vq"}}
    return [
        {"kind": "run", "device": "cuda", "dry_run": False, "deadline_s": 540},
        {"kind": "machine", "name": "NVIDIA H200", "arch": "9.0a"},
        info,
        {"kind": "stage_start", "stage": "tests", "budget_s": 170, "allotted_s": 200},
        {"kind": "test", "family": "lowbit", "item": "t1[cuda]", "outcome": "passed",
         "kernels": {"quant_linear.cuda": 1, "quant_linear_mma.cuda": 1}},
        {"kind": "test", "family": "lowbit", "item": "t2[cuda]", "outcome": "failed", "message": "E assert 1 == 2",
         "kernels": {"quant_linear.cuda": 2}},
        {"kind": "test", "family": "vq", "item": "v1[cuda]", "outcome": "passed", "kernels": {"vq_linear.cuda": 1}},
        {"kind": "test", "family": "vq", "item": "v2[cuda]", "outcome": "not_run"},
        {"kind": "stage_end", "stage": "tests", "status": "timeout", "seconds": 200},
        {"kind": "sanitizer_tool", "available": True},
        {"kind": "case", "family": "lowbit", "item": "mma", "outcome": "ok", "path_ok": True,
         "kernels": {"quant_linear.cuda": 1, "quant_linear_mma.cuda": 1}},
        {"kind": "case", "family": "lowbit", "item": "gemv", "outcome": "ok", "path_ok": False,
         "kernels": {"quant_linear.cuda": 1}},
        {"kind": "finding", "family": "lowbit", "case": "mma", "category": "memory", "text": "Invalid __global__ read",
         "where": "quant_mma_kernel"},
        {"kind": "sanitizer_process", "family": "lowbit", "error_summary": 1},
        {"kind": "case", "family": "vq", "item": "lin", "outcome": "ok", "kernels": {"vq_linear.cuda": 1}},
        {"kind": "case", "family": "vq", "item": "deq", "outcome": "ok", "kernels": {"vq_dequantize.cuda": 1}},
        {"kind": "sanitizer_process", "family": "vq", "error_summary": 0},
        {"kind": "bench_item", "family": "bench", "item": "limits", "outcome": "ok", "kernels": {}},
        {"kind": "bench", "family": "limits", "item": "limits", "op": "copy", "ours_ms": 1.0, "bytes_moved": 4.0e9},
        {"kind": "bench", "family": "limits", "item": "limits", "op": "gemm", "ours_ms": 1.0, "flops": 0.8e12},
        {"kind": "bench_item", "family": "bench", "item": "lowbit:4096x14336:M1", "outcome": "ok",
         "kernels": {"quant_linear.cuda": 3}},
        {"kind": "bench", "family": "lowbit", "item": "lowbit:4096x14336:M1", "op": "quant_linear w2g64",
         "shape": "4096x14336 M=1", "ours_ms": 0.01, "baseline": "F.linear float16 (cuBLAS)", "baseline_ms": 0.06,
         "speedup": 6.0, "bytes_moved": 20e6, "flops": 1.2e8, "ok": True, "goal": {"text": ">=5x cuBLAS", "met": True}},
        {"kind": "bench_item", "family": "bench", "item": "vq:4096x11008:M1", "outcome": "timeout",
         "message": "killed"},
    ]


def test_summary_per_kernel_rows_and_rerun():
    s = gpu_check.summarize(_records())
    k = s["kernels"]
    assert list(k) == ["quant_linear.cuda", "quant_linear_mma.cuda", "vq_dequantize.cuda", "vq_linear.cuda"]
    assert k["quant_linear.cuda"] | {} == {"family": "lowbit", "ran": True, "tests": 2, "passed": 1, "failed": 1,
                                          "sanitizer": "1 finding(s)", "path_ok": False, "bench_items": 1}
    assert k["quant_linear_mma.cuda"]["sanitizer"] == "1 finding(s)" and k["quant_linear_mma.cuda"]["path_ok"]
    assert k["vq_linear.cuda"]["sanitizer"] == "clean" and k["vq_dequantize.cuda"]["tests"] == 0
    assert s["families"]["vq"]["not_run"] == 1 and s["families"]["lowbit"]["failed"] == 1
    # The measured ceilings of the run replace KINDS.md's: 4 GB in 1 ms = 4000 GB/s, 0.8 TFLOP in 1 ms = 800 TFLOP/s.
    assert s["limits"]["hbm_gbps_measured"] == pytest.approx(4000) and s["limits"]["bf16_tflops_measured"] == \
        pytest.approx(800)
    (row,) = s["bench"]
    assert row["fraction_measured"] == pytest.approx(2000 / 4000) and row["fraction_spec"] == pytest.approx(2000 / 4800)
    assert s["rerun"] == "tests:vq,bench:vq:4096x11008:M1"
    text = gpu_check.format_summary(s)
    assert "quant_linear_mma.cuda" in text and "met >=5x cuBLAS" in text and "FAILED [lowbit] t2[cuda]" in text
    assert text.splitlines()[-1] == "rerun what is left: --only tests:vq,bench:vq:4096x11008:M1"
    # A rerun's results merged with the first run's: the test left out before now passed.
    merged = gpu_check.summarize(_records() + [{"kind": "test", "family": "vq", "item": "v2[cuda]",
                                                "outcome": "passed", "kernels": {"vq_dequantize.cuda": 1}}])
    assert merged["families"]["vq"]["passed"] == 2 and merged["kernels"]["vq_dequantize.cuda"]["tests"] == 1


def test_summary_of_a_full_run_fits_the_output_tail():
    """The device tool returns the last 12,000 characters of the output: a full run's summary (every CUDA kernel,
    30 bench rows, many failures and findings) must fit, with room for the lines before it."""
    records = _records()
    keys = [k for k in blockops.build_info()["kernel_counters"] if k.endswith(".cuda")]
    records[2] = {"kind": "build_info", "kernel_counters": {k: blockops.build_info()["kernel_counters"][k]
                                                            for k in keys}}
    row = next(r for r in records if r.get("kind") == "bench" and r["family"] == "lowbit")
    records += [dict(row, op=f"{row['op']} variant {i} with a long name", shape=row["shape"] + " and more")
                for i in range(30)]
    records += [{"kind": "test", "family": "attention", "item": f"tests/test_attention.py::test_x[{i}-cuda]" * 2,
                 "outcome": "failed", "message": "E " + "x" * 500} for i in range(60)]
    records += [{"kind": "finding", "family": "vq", "case": "c", "category": "memory", "text": "y" * 300,
                 "where": "z" * 400}] * 20
    text = gpu_check.format_summary(gpu_check.summarize(records))
    assert len(text) < 11000, len(text)


def test_worker_covers_every_cuda_kernel_and_bench_item():
    assert list(gpu_check_worker.BENCH_ITEMS) == list(gpu_check.BENCH_ITEM_IDS)
    # every bench family with kernels of its own (context_parallel runs the attention kernels across ranks)
    kernel_benches = {f for f in blockops.bench.FAMILIES if blockops.bench.FAMILY_OPS[f]}
    assert set(gpu_check_worker.CASES) == set(gpu_check.FAMILIES) == kernel_benches
    assert {item.split(":")[0] for item in gpu_check.BENCH_ITEM_IDS} == set(gpu_check.FAMILIES) | {"limits"}
    expected = {k for family in gpu_check.FAMILIES for _, _, want in gpu_check_worker.CASES[family]() for k in want}
    cuda_kernels = {k for k in blockops.build_info()["kernel_counters"] if k.endswith(".cuda")}
    assert sorted(cuda_kernels - expected) == [], "a CUDA kernel path without a sanitizer case"
    assert sorted(expected - cuda_kernels) == []
    files = {f for fs in gpu_check.TEST_FILES.values() for f in fs}
    assert all(os.path.exists(os.path.join(ROOT, "tests", f)) for f in files)
    assert set(gpu_check.TEST_FILES) == set(gpu_check.FAMILIES)


@pytest.mark.parametrize("family", gpu_check.FAMILIES)
def test_sanitizer_cases_run_on_cpu(family):
    """Every case of the sanitizer stage runs (on the CPU kernels here) and runs its family's kernels."""
    for name, fn, _ in gpu_check_worker.CASES[family]():
        before = blockops.kernel_call_counts()
        fn("cpu")
        after = blockops.kernel_call_counts()
        moved = {k for k in after if after[k] != before[k] and k.endswith(".cpu")}
        assert moved & {k for k, f in blockops.build_info()["kernel_counters"].items() if f == family}, name


def test_bench_items_run_on_cpu():
    """Every bench item at its CPU size (one timed call per timing): rows with a measured time, holding their
    tolerance; the goals are GPU goals and stay off CPU rows."""
    from blockops.bench import harness

    with harness.smoke_timing():
        for item, (fn, _) in gpu_check_worker.BENCH_ITEMS.items():
            rows = fn("cpu", True)
            assert rows and all(r.ours_ms > 0 for r in rows), item
            bad = harness.failures(rows)
            assert not bad, (item, [(r.op, r.max_error, r.tolerance) for r in bad])


def _outcomes_follow(outcomes: list[str], expected: list[str]) -> bool:
    """The outcomes of a job cut at some point: a prefix of `expected`, then at most one "timeout" (the item in flight
    at the cut), then "not_run" for the rest."""
    i = 0
    while i < len(outcomes) and i < len(expected) and outcomes[i] == expected[i]:
        i += 1
    if i < len(outcomes) and outcomes[i] == "timeout":
        i += 1
    return all(o == "not_run" for o in outcomes[i:])


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    # Tests (bitpack, 5 tests): the 2nd fails (planted), the 4th hangs with no per-test timeout to save it: the stage
    # is cut at its end time, t = 98 - 8 - 35 - 35 = 20 s (the later stages' budgets are theirs, whatever the tests
    # take). Sanitizer (dllm): the 2nd case hangs, is killed at its 2 s timeout, and a fresh process runs the rest.
    # Bench (dllm): the unmask item crashes, a fresh process runs the rest. About 40 s on 2 idle cores; the later
    # stages' budgets leave room for a loaded machine (where the tests stage may be cut before its hang).
    env = dict(os.environ, GPU_CHECK_PLANT="fail:tests:dtype1,hang:tests:dtype3,hang:sanitizer:unmask threshold,"
                                           "crash:bench:dllm:unmask")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run", "--out", str(out),
           "--only", "tests:bitpack,sanitizer:dllm,bench:dllm", "--tests-k", "every_input_dtype", "--deadline", "98",
           "--budget", "tests=5,sanitizer=35,bench=35", "--timeout", "tests=100,sanitizer=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = out / "results.jsonl"
    streamed = False
    while proc.poll() is None:
        if results.exists() and any(json.loads(line)["kind"] in ("test", "case")
                                    for line in results.read_text().splitlines() if line.strip()):
            streamed = proc.poll() is None      # a child's result is in the file while the run still goes on
            break
        time.sleep(0.2)
    stdout, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, stdout
    assert streamed, "no test or case record in results.jsonl while the run was going on"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "summary"

    # Stages in order; the build skipped (dry run); the tests stage cut, the later ones run to the end.
    starts = [r["stage"] for r in records if r["kind"] == "stage_start"]
    ends = {r["stage"]: r for r in records if r["kind"] == "stage_end"}
    assert starts == ["tests", "sanitizer", "bench"]
    assert ends["build"]["status"] == "skipped"
    assert ends["tests"]["status"] == "timeout" and ends["sanitizer"]["status"] == "ok" and \
        ends["bench"]["status"] == "ok"
    assert ends["tests"]["seconds"] < 21

    tests = [r for r in records if r["kind"] == "test"]
    summary = records[-1]
    if tests:      # collected before the cut (always, unless the machine is very loaded)
        collected = next(r for r in records if r["kind"] == "collected" and r["stage"] == "tests")
        assert [r["item"] for r in tests] == collected["items"] and len(tests) == 5      # each test once, in order
        assert all(r["family"] == "bitpack" and r["item"].endswith(f"[dtype{i}-cpu]") for i, r in enumerate(tests))
        outcomes = [r["outcome"] for r in tests]
        assert _outcomes_follow(outcomes, ["passed", "failed", "passed", "timeout"]), outcomes
        if outcomes[1] == "failed":
            assert "planted failure" in tests[1]["message"]
        if outcomes[0] == "passed":
            assert set(tests[0]["kernels"]) == {"pack_bits.cpu"}
        counts = summary["families"]["bitpack"]
        assert counts["tests"] == 5 and counts["passed"] == outcomes.count("passed")
        # The planted failure and the hang come before the kernels run: they count for the family, not for a kernel.
        assert summary["kernels"]["pack_bits.cpu"]["tests"] == outcomes.count("passed")
    else:
        assert any(r["kind"] == "job_not_run" and r["family"] == "bitpack" for r in records)

    cases = {r["item"]: r for r in records if r["kind"] == "case"}
    assert [r["outcome"] for r in cases.values()] == ["ok", "timeout", "ok", "ok"]
    assert "2 s item timeout" in cases["unmask threshold fp32 B=2 L=16 V=1000"]["message"]
    assert cases["kv_overwrite bf16 B=2 H=3 S=40 n=5 D=16"]["kernels"] == {"dllm_kv_overwrite.cpu": 1}
    assert [r["reason"] for r in records if r["kind"] == "restart"] == ["timeout", "exit"]
    sanitized = {r["family"] for r in records if r["kind"] in ("case", "collected") and r["stage"] == "sanitizer"}
    assert sanitized == {"dllm"}
    assert "Fatal Python error" in (out / "sanitizer.log").read_text()      # the killed case's Python stack

    items = {r["item"]: r["outcome"] for r in records if r["kind"] == "bench_item"}
    assert items == {"limits": "ok", "dllm:unmask": "crashed", "dllm:kv_overwrite": "ok"}
    rows = [r for r in records if r["kind"] == "bench"]
    assert {r["family"] for r in rows} == {"limits", "dllm"}
    assert all(r["limit"] == "bandwidth" and r["fraction_spec"] > 0 for r in rows if r["family"] == "dllm")

    assert summary["dry_run"] and set(summary["kernels"]) == {"pack_bits.cpu", "unpack_bits.cpu", "dllm_unmask.cpu",
                                                              "dllm_kv_overwrite.cpu"}
    assert summary["kernels"]["dllm_kv_overwrite.cpu"]["sanitizer"] == "ran bare"
    assert summary["kernels"]["dllm_kv_overwrite.cpu"]["bench_items"] == 1
    assert summary["rerun"] == "tests:bitpack,sanitizer:dllm,bench:dllm:unmask"
    text = (out / "summary.txt").read_text()
    assert stdout.rstrip().endswith(text.rstrip()) and "dllm_unmask.cpu" in text and "DRY RUN" in text
    assert sorted(os.listdir(out)) == ["bench.log", "results.jsonl", "sanitizer.log", "summary.txt", "tests.log"]
