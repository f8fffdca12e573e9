"""The main job's entry point works end to end: `python -m blockops bench` prints its table, writes JSON and
a PNG (one family, to keep the test short), and `python -m blockops info` prints the build."""
import json
import subprocess
import sys

import pytest


def test_bench_cli_writes_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "blockops", "bench", "--device", "cpu", "--family", "bitpack",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, check=True,
    )
    assert "speed-up" in result.stdout and "pack_bits" in result.stdout
    payload = json.loads(out_json.read_text())
    assert payload["results"] and payload["read_bandwidth_gbps"] > 0
    for row in payload["results"]:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["note"] == ""
    assert out_png.stat().st_size > 1000


def test_path_is_a_deprecated_alias(capsys):
    from blockops import bench

    assert bench.resolve_families(["path", "bitpack", "path_attention"]) == ["path_attention", "bitpack"]
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown benchmark family"):
        bench.resolve_families(["nope"])


def test_info_cli():
    result = subprocess.run([sys.executable, "-m", "blockops", "info"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["version"]
