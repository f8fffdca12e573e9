"""Drop-in nn.Module replacements backed by blockops kernels."""
from blockops.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
