"""Quantization algorithms and pipelines built on blockops' ops (``blockops.ops``) and modules (``blockops.nn``).

- ``blockops.quant.rtn``: uniform 2/3/4-bit min-max round-to-nearest (``quantize_rtn`` for one weight, behind
  ``QuantLinear.from_linear``) and the model swap ``quantize_`` / ``QuantConfig``.
- ``blockops.quant.gptq``: loading EfficientQAT / GPTQ checkpoints into ``QuantLinear`` layers
  (``load_gptq_checkpoint``).
- ``blockops.quant.kmeans``: k-means (the codebooks of ``VQLinear.from_linear``).
- ``blockops.quant.vq4dit``: VQ4DiT's zero-data block-wise calibration of ``VQLinear`` layers.
- ``blockops.quant.ptq161``: PTQ1.61 (the initial quantization of a weight, ``quantize_weight``; activation scales,
  block-wise optimisation, preprocessing).
- ``blockops.quant.efficientqat``: EfficientQAT's Block-AP and E2E-QP.
- ``blockops.quant.pipeline``: the method registry and the CLI's quantize / eval entry points; ``data``,
  ``evaluate`` and ``report`` (which regenerates docs/quantization.md) serve it.

Layering: ``blockops.ops`` <- ``blockops.nn`` <- ``blockops.quant``. A module's ``from_linear`` calls its quantizer
here through a function-local import, so no module of ``blockops.nn`` imports this package at import time.
``efficientqat``, ``pipeline``, ``data``, ``evaluate`` and ``report`` are imported on demand."""
from blockops.quant import gptq, kmeans, ptq161, rtn, vq4dit

__all__ = ["gptq", "kmeans", "ptq161", "rtn", "vq4dit"]
