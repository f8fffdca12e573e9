"""1.61-bit weights (PTQ1.61): the user-facing namespace.

Where each layer lives:

- the ops (``ptq161_linear``, ``ptq161_dequantize``, their fakes and autograd) and the packed format (``FIELDS``,
  ``SALIENT_ALIGN``, ``salient_padded``, ``bits_per_weight``): :mod:`blockops.ops.ptq161` (layout table in its
  docstring and csrc/ptq161.h);
- the initial quantization of one weight (``quantize_weight``, ``salient_count``) and the paper's block-wise
  pipeline: :mod:`blockops.quant.ptq161`;
- the module: :class:`blockops.nn.PTQ161Linear`.
"""
from blockops.ops.ptq161 import FIELDS, SALIENT_ALIGN, bits_per_weight, ptq161_dequantize, ptq161_linear, salient_padded
from blockops.quant.ptq161 import quantize_weight, salient_count

__all__ = ["FIELDS", "bits_per_weight", "ptq161_dequantize", "ptq161_linear", "quantize_weight", "salient_count",
           "salient_padded"]
