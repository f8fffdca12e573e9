"""Instructions per weight of the CPU batch-1 GEMVs on the AVX2 path, a figure that does not depend on the machine's
load or on how fast its cores run AVX2 code (issue 18; docs/performance.md "Instructions per weight").

Usage: PYTHONPATH=python python tools/instructions_per_weight.py [FORMAT ...] [--in N --out N --rows M]
  FORMAT  lowbit-w2g64, lowbit-w3g64, lowbit-w4g128, ptq161, vq-2bit, vq-3bit, vq-aqlm2x8 (default: all)

Each format runs in a child process under valgrind's callgrind, which cannot execute AVX-512 and so takes the AVX2
path as an AVX2-only CPU would. Instructions are collected only inside the op's CPU entry point (the C++ function
named in ENTRY (e.g. quant_linear_cpu), everything it calls included: set-up, threads' work, epilogue), one thread, over CALLS calls
after one uncounted warm-up; printed per call and per weight (in x out). Slow: a few minutes per format (the torch
import runs under valgrind too). The weights are the bench's (blockops.bench.lowbit / ptq161 / vq)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CALLS = 4
FORMATS = ["lowbit-w2g64", "lowbit-w3g64", "lowbit-w4g128", "ptq161", "vq-2bit", "vq-3bit", "vq-aqlm2x8"]

# The child: builds one layer of FORMAT and calls it `calls` times (callgrind collects inside the op's entry point only).
CHILD = r"""
import sys, torch
torch.set_num_threads(1)
fmt, inn, out, rows, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
x = torch.randn(rows, inn, generator=torch.Generator().manual_seed(1))
if fmt.startswith("lowbit"):
    from blockops import ops
    from blockops.bench.lowbit import Config, _weights
    bits, gs = {"lowbit-w2g64": (2, 64), "lowbit-w3g64": (3, 64), "lowbit-w4g128": (4, 128)}[fmt]
    qw, s, z = _weights(Config(inn, out, bits, gs, rows), "cpu", torch.float16)
    f = lambda: ops.quant_linear(x, qw, s, z, bits, gs)
elif fmt == "ptq161":
    from blockops.ops import ptq161
    from blockops.bench.ptq161 import Config, packed_weights
    tensors, S = packed_weights(Config(inn, out, rows), "cpu")
    args = [tensors[k] for k in ptq161.FIELDS]
    f = lambda: ptq161.ptq161_linear(x, *args, S)
else:
    from blockops.ops import vq
    from blockops.bench.vq import Config, _weights
    codes, cb, sc = _weights(Config(inn, out, rows, {"vq-2bit": "2-bit", "vq-3bit": "3-bit", "vq-aqlm2x8": "aqlm2x8"}[fmt]),
                             torch.float16)
    f = lambda: vq.vq_linear(x, codes, cb, sc)
for _ in range(calls):
    f()
"""


# The op's CPU entry point per format. One name each, not a pattern matching several: callgrind's --toggle-collect
# toggles on every entry and exit of a matching function, so a nested match (ptq161_linear_cpu calls
# quant_linear_cpu through the dispatcher for its salient part) would switch collection off inside the outer one
# (it undercounted ptq161 by 28-34%).
ENTRY = {"lowbit": "*quant_linear_cpu*", "ptq161": "*ptq161_linear_cpu*", "vq": "*vq_linear_cpu*"}


def count(fmt: str, inn: int, out: int, rows: int, calls: int) -> int:
    """Instructions collected inside the format's entry point (ENTRY) over `calls` calls of one layer of `fmt`."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as fh:
            fh.write(CHILD)
        res = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={ENTRY[fmt.split('-')[0]]}",
                              f"--callgrind-out-file={tmp}/cg.out", sys.executable, script, fmt, str(inn), str(out),
                              str(rows), str(calls)], capture_output=True, text=True)
        m = re.search(r"Collected : (\d+)", res.stderr)
        if res.returncode != 0 or m is None:
            raise RuntimeError(f"{fmt}: callgrind run failed:\n{res.stderr[-3000:]}")
        return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("formats", nargs="*", metavar="FORMAT", help=f"of {', '.join(FORMATS)} (default: all)")
    ap.add_argument("--in", dest="inn", type=int, default=4096)
    ap.add_argument("--out", type=int, default=11008)
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args()
    unknown = [f for f in a.formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    for fmt in a.formats or FORMATS:
        # (CALLS + 1) calls minus 1 call: the first call's one-time work (lazy set-up) is not counted.
        per_call = (count(fmt, a.inn, a.out, a.rows, CALLS + 1) - count(fmt, a.inn, a.out, a.rows, 1)) / CALLS
        print(f"{fmt:14s} {a.inn}x{a.out} M={a.rows}: {per_call:.4g} instructions per call, "
              f"{per_call / (a.inn * a.out):.3f} per weight (AVX2 path, callgrind)", flush=True)


if __name__ == "__main__":
    main()
