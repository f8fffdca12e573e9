"""VQLinear: an nn.Linear whose weight is stored as vector-quantized codes into K in {1, 2} additive codebooks
(VQ4DiT; AQLM with out_group_size 1; layout in csrc/vq.h) and multiplied by blockops' VQ kernels."""
from __future__ import annotations

import math

import torch
from torch import nn

from blockops.ops import vq


class VQLinear(nn.Module):
    """``y = x @ W_hat^T + bias`` with ``W_hat[n, j*d:(j+1)*d] = scales[n] * sum_K codebooks[K, codes[n, j, K]]``.

    Buffers: ``codes [out, in/d, K]`` (uint8 for k <= 256, else int16 read as uint16). Parameters:
    ``codebooks [K, k, d]`` (trainable, VQ4DiT's codebook fine-tuning), ``scales [out]`` or None, ``bias [out]``
    or None. CPU and CUDA kernels (:func:`blockops.ops.vq.vq_linear`); the CUDA ones (GEMV up to 8 rows,
    ``mma.sync`` tiles above) are compiled for sm_80/sm_90a and checked in a CPU emulator, not yet run on a GPU.
    """

    def __init__(self, in_features: int, out_features: int, codebook_size: int = 256, vector_dim: int = 4,
                 num_codebooks: int = 1, bias: bool = True, scales: bool = False, dtype: torch.dtype = torch.float16,
                 device=None):
        super().__init__()
        if vector_dim not in (2, 4, 8):
            raise ValueError(f"VQLinear: vector_dim must be 2, 4 or 8, got {vector_dim}")
        if num_codebooks not in (1, 2):
            raise ValueError(f"VQLinear: num_codebooks must be 1 or 2, got {num_codebooks}")
        if not 16 <= codebook_size <= 65536:
            raise ValueError(f"VQLinear: codebook_size must be in [16, 65536], got {codebook_size}")
        if in_features % vector_dim:
            raise ValueError(f"VQLinear: in_features={in_features} is not divisible by vector_dim={vector_dim}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"VQLinear: dtype must be fp16, bf16 or fp32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.codebook_size, self.vector_dim, self.num_codebooks = codebook_size, vector_dim, num_codebooks
        code_dtype = torch.uint8 if codebook_size <= 256 else torch.int16
        self.register_buffer("codes", torch.zeros(out_features, in_features // vector_dim, num_codebooks,
                                                  dtype=code_dtype, device=device))
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks, codebook_size, vector_dim, dtype=dtype, device=device))
        self.scales = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)) if scales else None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float | None = None, codebook_size: int | None = None,
                    vector_dim: int = 4, num_codebooks: int = 1, iters: int = 25, seed: int = 0, scales: bool = True,
                    dtype: torch.dtype | None = None) -> "VQLinear":
        """k-means quantization of ``linear.weight`` split into ``vector_dim``-long vectors along ``in``.

        Give ``bits`` (per weight, codes only: ``codebook_size = 2 ** (bits * vector_dim / num_codebooks)``,
        e.g. 2 bits at d = 4 -> k = 256, 3 bits at d = 2 -> k = 64) or ``codebook_size``. As in VQ4DiT, k is
        clamped for tiny layers to the power of two nearest ``out * in / d / 4`` (at least 16). ``scales``:
        divide each row by its RMS first and keep it as the per-row scale. With ``num_codebooks = 2`` the second
        codebook is k-means on the residual of the first (residual VQ; AQLM's beam search is not implemented).
        """
        from blockops.quant.kmeans import kmeans   # the algorithm layer (its package imports blockops.nn)

        if (bits is None) == (codebook_size is None):
            raise ValueError("VQLinear.from_linear: give exactly one of bits and codebook_size")
        if bits is not None:
            log_k = bits * vector_dim / num_codebooks
            if abs(log_k - round(log_k)) > 1e-9:
                raise ValueError(f"VQLinear.from_linear: bits * vector_dim / num_codebooks = {log_k} must be an integer")
            codebook_size = 2 ** round(log_k)
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        vectors_count = out_features * in_features // vector_dim
        if vectors_count >= 64:
            codebook_size = min(codebook_size, max(16, 2 ** round(math.log2(vectors_count / 4))))
        codebook_size = min(codebook_size, vectors_count)
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16)
                          else torch.float16)
        module = cls(in_features, out_features, max(codebook_size, 16), vector_dim, num_codebooks,
                     linear.bias is not None, scales, dtype, weight.device)
        if scales:
            row_scale = weight.pow(2).mean(1).sqrt().clamp_min(1e-8)
            weight = weight / row_scale[:, None]
            module.scales.data.copy_(row_scale)
        residual = weight.reshape(-1, vector_dim)
        codebooks = torch.zeros(num_codebooks, module.codebook_size, vector_dim, device=weight.device)
        codes = torch.zeros(residual.shape[0], num_codebooks, dtype=torch.long, device=weight.device)
        for c in range(num_codebooks):
            centroids, idx, _ = kmeans(residual, codebook_size, iters, seed + c)
            codebooks[c, :codebook_size] = centroids
            codes[:, c] = idx
            residual = residual - centroids[idx]
        module.codebooks.data.copy_(codebooks)
        module.codes.copy_(codes.reshape(out_features, in_features // vector_dim, num_codebooks)
                           .to(torch.int32).to(module.codes.dtype))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_aqlm(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> "VQLinear":
        """From AQLM ``QuantizedLinear`` tensors: ``codes [num_out_groups, num_in_groups, num_codebooks]`` int8
        or int16 (unsigned values in signed ints), ``codebooks [num_codebooks, codebook_size, out_group_size,
        in_group_size]``, ``scales [num_out_groups, 1, 1, 1]``, ``bias [out]``. Only ``out_group_size = 1`` is
        supported (then ``out = num_out_groups``, ``d = in_group_size`` in {2, 4, 8}); num_codebooks in {1, 2}.
        int8 codes become uint8 with the same bits (AQLM reads them mod 256); int16 codes are kept (read mod
        65536). The tensors are copied into the module; codes out of range are reported by the first forward."""
        if codebooks.dim() != 4 or codes.dim() != 3:
            raise ValueError(f"VQLinear.from_aqlm: expected codes [out_groups, in_groups, K] and codebooks "
                             f"[K, k, out_group, in_group], got {tuple(codes.shape)} and {tuple(codebooks.shape)}")
        num_codebooks, codebook_size, out_group, in_group = codebooks.shape
        if out_group != 1:
            raise ValueError(f"VQLinear.from_aqlm: only out_group_size = 1 is supported, got {out_group}")
        if codes.shape[2] != num_codebooks:
            raise ValueError(f"VQLinear.from_aqlm: codes has {codes.shape[2]} codebooks, codebooks {num_codebooks}")
        if codes.dtype not in (torch.int8, torch.int16, torch.uint8):
            raise ValueError(f"VQLinear.from_aqlm: codes must be int8 or int16, got {codes.dtype}")
        out_features, in_groups = codes.shape[0], codes.shape[1]
        if scales is not None and scales.numel() != out_features:
            raise ValueError(f"VQLinear.from_aqlm: scales must be [{out_features}, 1, 1, 1], got {tuple(scales.shape)}")
        module = cls(in_groups * in_group, out_features, codebook_size, in_group, num_codebooks, bias is not None,
                     scales is not None, codebooks.dtype, codes.device)
        # The codes keep their width (an 8-bit code cannot exceed 255 whatever k is), so no value is rewritten.
        module.codes = (codes.view(torch.uint8) if codes.dtype == torch.int8 else codes).contiguous().clone()
        module.codebooks.data.copy_(codebooks.reshape(num_codebooks, codebook_size, in_group))
        if scales is not None:
            module.scales.data.copy_(scales.reshape(out_features))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    # ---- use --------------------------------------------------------------------------------------------------

    def dequantize(self) -> torch.Tensor:
        """``W_hat [out, in]`` in the codebooks' dtype."""
        return vq.vq_dequantize(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vq.vq_linear(x.contiguous(), self.codes, self.codebooks, self.scales, self.bias)

    def bits_per_weight(self) -> tuple[float, float]:
        """``(code bits, total bits)`` per weight, total including codebooks and scales at their dtype."""
        width = torch.finfo(self.codebooks.dtype).bits
        return vq.bits_per_weight(self.out_features, self.in_features, self.codebook_size, self.vector_dim,
                                  self.num_codebooks, width, width if self.scales is not None else 0)

    def extra_repr(self) -> str:
        code, total = self.bits_per_weight()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codebooks={self.num_codebooks}x{self.codebook_size}, vector_dim={self.vector_dim}, "
                f"scales={self.scales is not None}, bias={self.bias is not None}, "
                f"bits_per_weight={code:.3g} ({total:.3g} with codebooks and scales)")
