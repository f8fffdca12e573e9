"""blockops: fast, trainable building blocks for block-wise methods (low-bit and VQ GEMM, block-sparse and
PaTH attention, cached-block skipping), as `torch.ops.blockops.*` ops, nn.Modules and benchmarks.

Layers: ``blockops.ops`` (one op-layer module per kernel family: typed wrappers, fake implementations, autograd),
``blockops.nn`` (modules), ``blockops.quant`` (quantization algorithms and pipelines); the user-facing namespaces
``blockops.attention``, ``blockops.distributed`` (context parallelism), ``blockops.vq``, ``blockops.ptq161``,
``blockops.dllm``, ``blockops.block_cache`` (former name ``blockops.cache``) and this package's own names are built
on them."""
from __future__ import annotations

import copy

from blockops._loader import load as _load

_C, _BUILD_INFO = _load()

from blockops import ops  # noqa: E402  (registers fake implementations and autograd)
from blockops.ops.bitpack import pack_bits, unpack_bits  # noqa: E402
from blockops import attention, nn  # noqa: E402
from blockops import quant, vq  # noqa: E402
from blockops import block_cache, cache, dllm, ptq161  # noqa: E402
from blockops import distributed  # noqa: E402
from blockops.quant.gptq import load_gptq_checkpoint  # noqa: E402
from blockops.quant.rtn import QuantConfig, quantize_  # noqa: E402
from blockops import integrations  # noqa: E402

integrations.register()   # transformers' quantizer "blockops" and attn_implementation "blockops", if installed

__version__ = _BUILD_INFO["version"]


def build_info() -> dict:
    """What this build contains.

    Keys: ``version``, ``torch_version`` (the torch it was built against), ``compiler``, ``cpu_isa``
    (``"avx2+fma"`` or ``"portable"``: what the CPU kernels use in this process), ``cpu_parallel``
    (``"openmp"`` when the CPU kernels run on torch's threads), ``cpu_families``
    (kernel family -> CPU ISA), ``cuda_compiled``, ``cuda_version``, ``cuda_families`` (kernel family ->
    list of CUDA architectures it was compiled for, e.g. ``["8.0", "9.0a"]``), ``hopper_kernels`` (family ->
    whether its sm_90a wgmma + TMA kernels were compiled: CUTLASS/CuTe headers found and ``9.0a`` built; an H100 /
    H200 then runs them), ``cutlass_include``.
    """
    return copy.deepcopy(_BUILD_INFO)


def kernel_call_counts() -> dict[str, int]:
    """Calls per compiled kernel entry point (``"<op>.<backend>"``), counted inside the C++ library."""
    return dict(_C.kernel_call_counts())


__all__ = ["QuantConfig", "attention", "block_cache", "build_info", "cache", "distributed", "dllm", "integrations",
           "kernel_call_counts", "load_gptq_checkpoint", "nn", "ops", "pack_bits", "ptq161", "quant", "quantize_",
           "unpack_bits", "vq"]
