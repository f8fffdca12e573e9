"""Drop-in nn.Module replacements backed by blockops kernels."""
from blockops.nn.block_sparse_attention import BlockSparseAttention, BlockSparseMultiheadAttention, swap_attention
from blockops.nn.path_attention import PaTHAttention, PaTHAttentionCache
from blockops.nn.quant_linear import QuantLinear

__all__ = ["BlockSparseAttention", "BlockSparseMultiheadAttention", "PaTHAttention", "PaTHAttentionCache",
           "QuantLinear", "swap_attention"]
