"""Vector-quantized weights (VQ4DiT; AQLM with ``out_group_size = 1``): the user-facing namespace.

Where each layer lives:

- the ops (``vq_linear``, ``vq_dequantize``, their fakes and autograd) and the format's bit count
  (``bits_per_weight``): :mod:`blockops.ops.vq` (layout in its docstring and csrc/vq.h);
- k-means (``kmeans``): :mod:`blockops.quant.kmeans`;
- VQ4DiT calibration (``calibrate_blockwise``, ``candidate_sets``, ``quantize_blocks``, ``blockwise_mse``,
  ``SoftVQLinear``, ``CalibrationResult``): :mod:`blockops.quant.vq4dit`;
- the module: :class:`blockops.nn.VQLinear`.
"""
from blockops.ops.vq import bits_per_weight, vq_dequantize, vq_linear
from blockops.quant.kmeans import kmeans
from blockops.quant.vq4dit import (CalibrationResult, SoftVQLinear, blockwise_mse, calibrate_blockwise,
                                   candidate_sets, quantize_blocks)

__all__ = ["CalibrationResult", "SoftVQLinear", "bits_per_weight", "blockwise_mse", "calibrate_blockwise",
           "candidate_sets", "kmeans", "quantize_blocks", "vq_dequantize", "vq_linear"]
