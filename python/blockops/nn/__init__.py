"""Drop-in nn.Module replacements backed by blockops kernels.

They call the op layer (``blockops.ops.<family>``); the ``from_linear`` constructors call their quantizer in
``blockops.quant`` (imported inside the method, since ``blockops.quant`` builds on these modules)."""
from blockops.nn.block_sparse_attention import BlockSparseAttention, BlockSparseMultiheadAttention, swap_attention
from blockops.nn.path_attention import PaTHAttention, PaTHAttentionCache
from blockops.nn.ptq161_linear import PTQ161Linear
from blockops.nn.quant_linear import QuantLinear
from blockops.nn.vq_linear import VQLinear

__all__ = ["BlockSparseAttention", "BlockSparseMultiheadAttention", "PaTHAttention", "PaTHAttentionCache", "PTQ161Linear",
           "QuantLinear", "VQLinear", "swap_attention"]
