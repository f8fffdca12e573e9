"""Focused timing of the CPU VQ GEMM against fp32 F.linear on the bench's LLM shapes, for a loaded machine.

Usage: PYTHONPATH=python python tools/vq_cpu_timing.py ROWS FORMATS [T]
  ROWS     comma-separated batch sizes, e.g. 1,2,4,8,16
  FORMATS  comma-separated keys of blockops.bench.vq.FORMATS (2-bit, 3-bit, aqlm2x8)
  T        use the transposed shape 11008 x 4096 (in x out) instead of 4096 x 11008
Environment: ROUNDS (default 5) rounds of 10 calls each, ours and F.linear interleaved per round;
THREADS=n sets torch's thread count; CPUTIME=1 measures the calling thread's CPU time (time.thread_time, use with
THREADS=1) instead of wall time, which the load of other processes disturbs far less. Prints best and median
of each and their ratio, with the 1-minute load average."""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from blockops import vq
from blockops.bench.vq import Config, _weights

CLOCK = time.thread_time if os.environ.get("CPUTIME") else time.perf_counter
if os.environ.get("THREADS"):
    torch.set_num_threads(int(os.environ["THREADS"]))


def timings(fn, n):
    fn()
    fn()
    out = []
    for _ in range(n):
        t0 = CLOCK()
        fn()
        out.append((CLOCK() - t0) * 1e3)
    return out


def main():
    rows_list = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "1").split(",")]
    formats = (sys.argv[2] if len(sys.argv) > 2 else "2-bit").split(",")
    in_f, out_f = (11008, 4096) if len(sys.argv) > 3 and sys.argv[3] == "T" else (4096, 11008)
    rounds = int(os.environ.get("ROUNDS", "5"))
    w = torch.randn(out_f, in_f)
    for fmt in formats:
        for rows in rows_list:
            codes, codebooks, scales = _weights(Config(in_f, out_f, rows, fmt), torch.float16)
            x = torch.randn(rows, in_f)
            ours, base = [], []
            for _ in range(rounds):
                ours += timings(lambda: vq.vq_linear(x, codes, codebooks, scales), 10)
                base += timings(lambda: F.linear(x, w), 10)
            bo, mo, bb, mb = min(ours), statistics.median(ours), min(base), statistics.median(base)
            load = open("/proc/loadavg").read().split()[0]
            print(f"{fmt:8s} {in_f}x{out_f} M={rows:2d}: ours best {bo:6.2f} med {mo:6.2f} ms | fp32 F.linear best "
                  f"{bb:6.2f} med {mb:6.2f} | ratio best {bb / bo:5.2f} med {mb / mo:5.2f} | load {load}", flush=True)


if __name__ == "__main__":
    main()
