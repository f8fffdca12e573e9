"""The main job's entry point works end to end: `python -m blockops bench` prints its table, writes JSON and a PNG
(one family, to keep the test short), every row names its ISA path and carries its error and tolerance, a row
above its tolerance makes the command exit 1 naming it, `--cpu-isa` runs and merges two ISA paths, `--smoke` times
one call per timing, and `python -m blockops info` prints the build. The smoke suite of every family, with the kernel
counters, checks that every registered op has a benchmark row and that each family's OPS names them. No timing is
asserted."""
import json
import os
import math
import subprocess
import sys

import pytest

import blockops
from blockops import bench
from blockops.__main__ import main
from blockops.bench import Result, harness


def test_bench_cli_writes_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "blockops", "bench", "--device", "cpu", "--family", "bitpack",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, check=True,
    )
    isa = blockops.build_info()["cpu_isa_path"]
    title, header = result.stdout.splitlines()[:2]
    assert f"CPU ISA path {isa}" in title
    assert all(col in header.split() for col in ("isa", "speed-up", "tol", "check"))
    assert "pack_bits" in result.stdout
    payload = json.loads(out_json.read_text())
    assert payload["results"] and payload["read_bandwidth_gbps"] > 0 and payload["isa"] == isa
    for row in payload["results"]:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["note"] == ""
        assert row["isa"] == isa and row["tolerance"] == 0 and row["max_error"] == 0 and row["ok"]
    assert out_png.stat().st_size > 1000


def _row(max_error, tolerance, op="planted"):
    return Result("bitpack", op, "2x3", "cpu", 1.0, "nothing", 2.0, max_error=max_error, tolerance=tolerance)


def test_result_ok():
    assert _row(1e-6, 1e-5).ok and _row(0.0, 0.0).ok and _row(1e-5, 1e-5).ok
    assert not _row(2e-5, 1e-5).ok and not _row(float("nan"), 1e-5).ok and not _row(None, 1e-5).ok
    assert _row(None, None).ok and _row(float("nan"), None).ok      # no tolerance: the row checks nothing
    assert _row(0.0, 0.0).isa == blockops.build_info()["cpu_isa_path"]
    back = Result.from_dict(json.loads(json.dumps(_row(3e-5, 1e-5).as_dict())))
    assert back == _row(3e-5, 1e-5) and not back.ok


def test_row_above_tolerance_fails_the_command(monkeypatch, capsys, tmp_path):
    rows = [_row(0.0, 0.0, "fine"), _row(3e-3, 1e-3, "planted wrong result"), _row(math.nan, 1e-3, "nan result"),
            _row(None, None, "whole sampler")]
    monkeypatch.setitem(bench.FAMILIES, "bitpack", lambda device, quick=True: rows)
    assert main(["bench", "--device", "cpu", "--family", "bitpack", "--json", str(tmp_path / "b.json")]) == 1
    out, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert "planted wrong result" in failed[0] and "2x3" in failed[0] and "0.003" in failed[0] and "0.001" in failed[0]
    assert "nan result" in failed[1]
    checks = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("bitpack")}
    assert "FAIL" in checks["planted"] and "ok" in checks["fine"] and "FAIL" not in checks["whole"]
    assert [r["ok"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == [True, False, False, True]
    monkeypatch.setitem(bench.FAMILIES, "bitpack", lambda device, quick=True: rows[:1] + rows[3:])
    assert main(["bench", "--device", "cpu", "--family", "bitpack"]) == 0


def test_path_is_a_deprecated_alias(capsys):
    assert bench.resolve_families(["path", "bitpack", "path_attention"]) == ["path_attention", "bitpack"]
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown benchmark family"):
        bench.resolve_families(["nope"])


def test_cpu_isa_runs_each_isa_and_merges(tmp_path):
    out_json = tmp_path / "isa.json"
    result = subprocess.run(
        [sys.executable, "-m", "blockops", "bench", "--family", "bitpack", "--cpu-isa", "avx2,native",
         "--json", str(out_json)],
        capture_output=True, text=True, check=True,
    )
    header = result.stdout.splitlines()[1].split()
    assert header[:4] == ["family", "op", "shape", "baseline"] and "vs" in header and header[-1] == "check"
    payload = json.loads(out_json.read_text())
    runs = {run["cpu_isa"]: run for run in payload["cpu_isa_runs"]}
    assert set(runs) == {"avx2", "native"}
    assert runs["avx2"]["build"]["cpu_isa_forced"] == "avx2" and runs["native"]["build"]["cpu_isa_forced"] == ""
    assert runs["avx2"]["isa"] in ("avx2", "portable")        # portable on a CPU without AVX2
    if not os.environ.get("BLOCKOPS_CPU_ISA"):  # this process's own path is the native one unless forced
        assert runs["native"]["isa"] == blockops.build_info()["cpu_isa_path"]
    for row in payload["results"]:
        assert row["isa"] == runs[row["cpu_isa"]]["isa"] and row["tolerance"] == 0 and row["ok"]
    assert len(payload["results"]) == 2 * len(payload["side_by_side"]) == 12
    for row in payload["side_by_side"]:
        assert row["avx2"]["ours_ms"] > 0 and row["native"]["ours_ms"] > 0 and row["native"]["ok"]


def test_info_cli():
    result = subprocess.run([sys.executable, "-m", "blockops", "info"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["version"]


def test_smoke_mode_times_one_call(monkeypatch, capsys):
    calls = []
    with harness.smoke_timing():
        assert harness.smoke_mode()
        harness.time_ms(lambda: calls.append(1), "cpu", warmup=3, min_repeats=10, min_seconds=1.0)
    assert calls == [1] and not harness.smoke_mode()
    seen = []

    def family(device, quick=True):
        seen.append((quick, harness.smoke_mode()))
        return [_row(0.0, 0.0)]

    monkeypatch.setitem(bench.FAMILIES, "bitpack", family)
    assert main(["bench", "--device", "cpu", "--family", "bitpack", "--smoke"]) == 0
    assert seen == [(True, True)] and not harness.smoke_mode()
    assert "smoke run" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--smoke", "--full"])
    with pytest.raises(ValueError, match="quick"):
        bench.run_suite("cpu", ["bitpack"], quick=False, smoke=True)


def test_smoke_suite_runs_every_op():
    """Every family's smoke suite on the CPU, one family at a time, in this process: every row holds its tolerance,
    the kernel counters show each op of blockops.build_info()["ops"] running on the CPU in some row, and each family
    module's OPS names exactly the ops of its family that ran in it (the expensive test: about a minute on 2 cores)."""
    op_family = blockops.build_info()["ops"]
    assert set(bench.FAMILY_OPS) == set(bench.FAMILIES)
    ran_somewhere = set()
    for family in bench.FAMILIES:
        before = blockops.kernel_call_counts()
        rows = bench.run_suite("cpu", [family], progress=False, smoke=True)
        after = blockops.kernel_call_counts()
        ran = {op for op in op_family if after[f"{op}.cpu"] > before[f"{op}.cpu"]}
        ran_somewhere |= ran
        assert rows and all(r.family == family for r in rows), family
        assert not bench.failures(rows), [(r.op, r.shape, r.baseline, r.max_error, r.tolerance)
                                          for r in bench.failures(rows)]
        assert sorted(bench.FAMILY_OPS[family]) == sorted(op for op in ran if op_family[op] == family), family
    assert sorted(set(op_family) - ran_somewhere) == []


def test_cli_unknown_family_version_and_help(capsys):
    """`bench --family nope` is a usage error listing the families (no traceback); --version; every quantize
    option has a help string."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--family", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark family 'nope'" in err and "bitpack" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("blockops ")
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, words in (("--bits", "bits per weight"), ("--group-size", "input channels sharing"),
                          ("--seed", "seed of")):
        assert f"{option} " in text and words in text, option
    from blockops.quant import report

    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "quantization methods to run" in text and "bit widths" in text and "group sizes" in text


def test_bench_plot_uses_a_log_axis():
    rows = [_row(0.0, 0.0, "slow"), Result("bitpack", "fast", "2x3", "cpu", 0.01, "nothing", 2.0)]
    fig = harness.figure(rows, "title")
    assert fig.axes[0].get_yscale() == "log"


def test_cli_labels_name_each_method():
    from blockops.quant.pipeline import method_label

    assert method_label({"method": "rtn", "bits": 2, "group_size": 64}) == "rtn w2g64"
    assert method_label({"method": "vq", "bits": 2, "group_size": 64, "settings": {"vector_dim": 4}}) == \
        "vq 2-bit codes d4"
    label = method_label({"method": "ptq161", "bits": 2, "group_size": 64, "settings": {"salient_ratio": 0.2}})
    assert label == "ptq161 (20% salient channels at 4 bits)" and "w2" not in label


def test_vq_kmeans_shows_progress(capsys):
    import torch

    from blockops.quant.vq4dit import quantize_blocks

    blocks = [torch.nn.Sequential(torch.nn.Linear(16, 16)) for _ in range(2)]
    quantize_blocks(blocks, bits=2, vector_dim=4, iters=1, progress=True)
    assert "VQ k-means" in capsys.readouterr().err
    quantize_blocks(blocks, bits=2, vector_dim=4, iters=1)
    assert "VQ k-means" not in capsys.readouterr().err
