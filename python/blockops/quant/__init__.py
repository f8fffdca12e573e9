"""Quantization algorithms and pipelines built on blockops' kernels and modules.

- ``blockops.quant.ptq161``: PTQ1.61 (activation scales, block-wise optimisation, preprocessing).
- ``blockops.quant.efficientqat``: EfficientQAT's Block-AP and E2E-QP.
- ``blockops.quant.pipeline``: the method registry and the CLI's quantize / eval entry points (RTN, EfficientQAT).

The 2/3/4-bit round-to-nearest quantizer and the GPTQ checkpoint loader stay in ``blockops.quantize``."""
from blockops.quant import ptq161

__all__ = ["ptq161"]
