"""Turns one of csrc/kernels/*.cu into C++ that g++ compiles against fake/ and ptx_emu.h (README.md). The source is
never modified; the output goes to a build folder.

    gen_emu.py SRC OUT [MUTATION_FROM MUTATION_TO]

- PTX needs no rewriting: the kernels take every inline-PTX wrapper from mma_ptx.cuh, and fake/mma_ptx.cuh (first
  on the include path) stands in for it; a kernel with asm of its own is refused (see the end of generate);
- `extern __shared__ int4 smem_raw[];` becomes the emulated block's dynamic shared-memory buffer;
- `kernel<<<grid, block, smem, stream>>>(args)` becomes emu_launch(EmuCfg(...), kernel, args). A template-id
  is wrapped in a generic lambda, because a kernel template with deduced arguments (lowbit.cu's
  dequantize_kernel<kBits>) has no address until it is called;
- a kernel file's own header (`#include "F.cuh"` in F_part.cu, e.g. attention_mma.cuh in attention_mma_fwd.cu) is
  inlined, so what it holds (launches too) is rewritten like the file, and a mutation can reach it: each kernel
  file including it gets its own copy (the header keeps everything in an anonymous namespace for that);
- attention.cu: the tensor-core dispatch is gated by a global `emu_allow_mma`, so the tests can also run the
  CUDA-core kernels for fp16/bf16.
The optional pair is a one-off textual mutation (mutations.sh): FROM must occur exactly once in SRC (with its own
header inlined).
"""
import os
import re
import sys


def inline_own_header(s, src_path):
    """Replaces `#include "F.cuh"` by the header's text when the kernel file is F.cu or F_*.cu (next to it)."""
    stem = os.path.splitext(os.path.basename(src_path))[0]

    def include(m):
        name = m.group(1)
        head = name[: -len(".cuh")]
        path = os.path.join(os.path.dirname(src_path), name)
        if not (stem == head or stem.startswith(head + "_")) or not os.path.exists(path):
            return m.group(0)
        text = open(path).read().replace("#pragma once\n", "", 1)
        return f"// ---- {name} (inlined by gen_emu.py) ----\n{text}// ---- end of {name} ----\n"

    return re.sub(r'^#include "([\w.]+\.cuh)"\n', include, s, flags=re.M)


def generate(s, mutation=None):
    if mutation is not None:
        frm, to = mutation
        if s.count(frm) != 1:
            raise SystemExit(f"mutation anchor occurs {s.count(frm)} times, must occur once: {frm!r}")
        s = s.replace(frm, to)
    s = s.replace("extern __shared__ int4 smem_raw[];", "int4* smem_raw = reinterpret_cast<int4*>(emu_dyn_smem);")

    def launch(m):
        kernel, cfg = m.group(1), m.group(2)
        if "<" in kernel:
            kernel = f"[&](auto... emu_args) {{ {kernel}(emu_args...); }}"
        return f"emu_launch(EmuCfg({cfg}), {kernel}, "

    s, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)<<<(.*?)>>>\(", launch, s, flags=re.S)
    if n == 0:
        raise SystemExit("no kernel launch found")
    dispatch = {
        "if (forward_path(p) == CudaPath::kMma)": "if (emu_allow_mma && forward_path(p) == CudaPath::kMma)",
        "if (backward_path(p) == CudaPath::kMma)": "if (emu_allow_mma && backward_path(p) == CudaPath::kMma)",
    }
    if any(k in s for k in dispatch):
        for k, v in dispatch.items():
            if s.count(k) != 1:
                raise SystemExit(f"attention dispatch changed: {k!r} occurs {s.count(k)} times")
            s = s.replace(k, v)
        ns = "namespace blockops::attention {"
        s = s.replace(ns, "bool emu_allow_mma = true;\n" + ns, 1)
    for left in ("<<<", "asm", "__cvta", "extern __shared__"):
        if left in s:
            raise SystemExit(f"{left!r} left in the output: the kernel uses something the emulator does not cover")
    return "#include <cstring>\n#include <type_traits>\n" + s


def main(argv):
    if len(argv) not in (3, 5):
        raise SystemExit(__doc__)
    src = inline_own_header(open(argv[1]).read(), argv[1])
    out = generate(src, (argv[3], argv[4]) if len(argv) == 5 else None)
    with open(argv[2], "w") as f:
        f.write(out)


if __name__ == "__main__":
    main(sys.argv)
