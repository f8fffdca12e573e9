"""Post-training quantization pipelines built on blockops' kernels and modules (``blockops.quant.ptq161``: PTQ1.61).

The 2/3/4-bit round-to-nearest quantizer and the GPTQ checkpoint loader stay in ``blockops.quantize``."""
from blockops.quant import ptq161

__all__ = ["ptq161"]
"""Quantization pipelines that drive blockops' quantized layers end to end on real models (EfficientQAT's
Block-AP and E2E-QP, round-to-nearest; `blockops.quant.pipeline` holds the method registry and the CLI's
quantize / eval entry points)."""
