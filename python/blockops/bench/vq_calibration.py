"""VQ4DiT calibration quality: block-output MSE of k-means alone vs k-means + `blockops.vq.calibrate_blockwise`, on
a small seeded DiT-style stack (attention + MLP blocks with adaLN modulation from a conditioning vector), for the
2-bit (k=256, d=4) and 3-bit (k=64, d=2) formats. Also the stack the calibration tests use.

`python bench/bench_vq_calibration.py [--json PATH]` prints a markdown table (docs/performance.md's VQ section).
The MSE is measured on held-out inputs (a different seed from calibration), each stack fed its own outputs."""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from blockops import vq
from blockops.nn import VQLinear


class ToyDiTBlock(nn.Module):
    """A DiT block in miniature: ``x + gate * Attention(modulate(LN(x)))`` then the same with an MLP, where
    shift, scale and gate come from the conditioning ``c`` (adaLN). Its inputs are far from isotropic: the
    modulation scales input channels unevenly, which is what makes output-aware calibration beat k-means
    (k-means weighs every weight alike)."""

    def __init__(self, dim: int, heads: int, hidden: int, cond_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.adaLN = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c))[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)   # 3 x [B, H, T, Dh]
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def toy_dit(num_blocks: int = 2, dim: int = 64, heads: int = 4, hidden: int = 192, cond_dim: int = 32,
            seed: int = 0) -> nn.ModuleList:
    """Seeded blocks. The adaLN biases give each input channel its own lasting scale (log-normal spread), and
    the weights have a low-rank part on top of noise, as trained weights do."""
    gen = torch.Generator().manual_seed(seed)
    blocks = nn.ModuleList()
    for _ in range(num_blocks):
        block = ToyDiTBlock(dim, heads, hidden, cond_dim)
        with torch.no_grad():
            for linear in (block.qkv, block.proj, block.fc1, block.fc2, block.adaLN):
                out_f, in_f = linear.weight.shape
                rank = max(1, min(out_f, in_f) // 8)
                low_rank = torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen)
                w = low_rank / rank ** 0.5 + 0.5 * torch.randn(out_f, in_f, generator=gen)
                linear.weight.copy_(w / in_f ** 0.5)
                linear.bias.copy_(0.1 * torch.randn(out_f, generator=gen))
            bias = block.adaLN.bias.view(6, dim)
            bias[1].copy_((0.5 * torch.randn(dim, generator=gen)).exp() - 1)    # scale1: 1 + scale is log-normal
            bias[4].copy_((0.5 * torch.randn(dim, generator=gen)).exp() - 1)    # scale2
            bias[2].fill_(1.0)                                          # gates open (adaLN-Zero after training)
            bias[5].fill_(1.0)
        blocks.append(block)
    return blocks


def toy_inputs(batch: int = 4, tokens: int = 16, dim: int = 64, cond_dim: int = 32):
    """``input_fn`` for :func:`toy_dit`: Gaussian tokens and a Gaussian conditioning vector (the zero-data
    recipe: no dataset), drawn from torch's global generator so that ``calibrate_blockwise``'s seed fixes them."""
    def input_fn():
        return torch.randn(batch, tokens, dim), {"c": torch.randn(batch, cond_dim)}
    return input_fn


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    bits: float
    vector_dim: int
    num_candidates: int = 2
    steps: int = 200
    lr_codebook: float = 1e-3    # 0: assignments only (no codebook, scale or bias training)


CONFIGS = [Config("2-bit k256 d4", 2, 4), Config("2-bit k256 d4, assignments only", 2, 4, lr_codebook=0.0),
           Config("2-bit k256 d4, n=3", 2, 4, num_candidates=3), Config("3-bit k64 d2", 3, 2)]


@torch.no_grad()
def _output_power(blocks, inputs) -> list[float]:
    """Mean square of the teacher's output after each block (the scale the MSE is to be read against)."""
    power = [0.0] * len(blocks)
    for x, kwargs in inputs:
        for i, block in enumerate(blocks):
            x = block(x, **kwargs)
            power[i] += x.pow(2).mean().item() / len(inputs)
    return power


def compare(config: Config, num_blocks: int = 3, dim: int = 128, hidden: int = 384, cond_dim: int = 64,
            eval_batches: int = 8, seed: int = 0, progress: bool = False) -> dict:
    """Output MSE after each block, k-means alone and calibrated, on held-out inputs; bits per weight."""
    teacher = toy_dit(num_blocks, dim, 4, hidden, cond_dim, seed=seed)
    student = vq.quantize_blocks(teacher, bits=config.bits, vector_dim=config.vector_dim, seed=seed)
    input_fn = toy_inputs(4, 32, dim, cond_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1000)
        held_out = [input_fn() for _ in range(eval_batches)]
    kmeans_mse = vq.blockwise_mse(teacher, student, held_out)
    output_power = _output_power(teacher, held_out)
    start = time.perf_counter()
    history = vq.calibrate_blockwise(teacher, student, input_fn, config.steps, num_candidates=config.num_candidates,
                                     lr_codebook=config.lr_codebook, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    calibrated_mse = vq.blockwise_mse(teacher, student, held_out)
    layers = [m for block in student for m in block.modules() if isinstance(m, VQLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    code_bits = sum(m.bits_per_weight()[0] * m.in_features * m.out_features for m in layers) / weights
    total_bits = sum(m.bits_per_weight()[1] * m.in_features * m.out_features for m in layers) / weights
    return dict(config=config.name, blocks=num_blocks, dim=dim, hidden=hidden, steps=config.steps,
                code_bits=code_bits, total_bits=total_bits, output_power=output_power, kmeans_mse=kmeans_mse,
                calibrated_mse=calibrated_mse,
                train_mse_first=[h[0] for h in history.mse], train_mse_last=[h[-1] for h in history.mse],
                seconds=seconds)


def main() -> None:
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description="VQ4DiT calibration quality on a toy DiT stack")
    parser.add_argument("--json", default="bench_results/vq_calibration.json")
    args = parser.parse_args()
    rows = [compare(c, progress=True) for c in CONFIGS]
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print("| format | bits/weight (codes; + codebooks, scales) | block | teacher output mean square | "
          "k-means MSE | calibrated MSE | calibrated / k-means |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for i, (p, a, b) in enumerate(zip(r["output_power"], r["kmeans_mse"], r["calibrated_mse"])):
            print(f"| {r['config']} | {r['code_bits']:.3g}; {r['total_bits']:.3g} | {i} | {p:.3g} | {a:.3g} | "
                  f"{b:.3g} | {b / a:.2f} |")
        print(f"<!-- {r['config']}: {r['steps']} steps per block, {r['seconds']:.1f} s -->")


if __name__ == "__main__":
    main()
