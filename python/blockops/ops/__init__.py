"""The op layer: one module per kernel family, each holding that family's typed wrappers around
``torch.ops.blockops.*`` (docstrings giving every argument's dtype, shape and layout), its fake (meta)
implementations, its autograd registrations and the small format constants and helpers they need:

==================  =========================================================================================
``bitpack``         ``pack_bits``, ``unpack_bits``, ``values_per_word``, ``packed_length``
``lowbit``          ``quant_linear``, ``quant_dequantize`` (2/3/4-bit group-wise GEMM, GPTQ-v2 layout)
``attention``       ``block_sparse_attention_op``, ``MASK_FIELDS`` (block-sparse attention)
``path_attention``  ``path_attention``, ``path_key_cache``, ``path_decode_step``, ``PathCache`` (PaTH attention)
``vq``              ``vq_linear``, ``vq_dequantize``, ``bits_per_weight`` (vector-quantized weights)
``ptq161``          ``ptq161_linear``, ``ptq161_dequantize``, ``bits_per_weight``, ``FIELDS``, ``SALIENT_ALIGN``,
                    ``salient_padded`` (1.61-bit weights, PTQ1.61's packed format)
``dllm``            ``unmask`` (-> ``Unmasked``), ``kv_overwrite``, ``kv_overwrite_range`` (masked diffusion LM decoding)
``block_cache``     ``relative_l1``, ``relative_l1_residual``, ``apply_residual``, ``cache_update`` (block skipping)
==================  =========================================================================================

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Importing this
package imports every family module, which registers the fake implementations and autograd. The algorithms built on
the ops live in ``blockops.quant``, the modules in ``blockops.nn``.
"""
from blockops.ops import attention, bitpack, block_cache, dllm, lowbit, path_attention, ptq161, vq
from blockops.ops.attention import MASK_FIELDS, block_sparse_attention_op
from blockops.ops.bitpack import pack_bits, packed_length, unpack_bits, values_per_word
from blockops.ops.lowbit import quant_dequantize, quant_linear

__all__ = ["MASK_FIELDS", "attention", "bitpack", "block_cache", "block_sparse_attention_op", "dllm", "lowbit",
           "pack_bits", "packed_length", "path_attention", "ptq161", "quant_dequantize", "quant_linear",
           "unpack_bits", "values_per_word", "vq"]
