"""Masked diffusion LM decoding benchmark (Fast-dLLM): blockops.dllm.generate on the tiny seeded-random model of
blockops/bench/tiny_dllm.py, for no cache / prefix / dual cache x decoding rules, against the baseline measured in
the same run (no cache, one token unmasked per step: LLaDA's sampler with steps = gen_length); and the fused
unmasking op against the eager PyTorch expression (softmax, max, threshold, top-1) on [B, L, V] logits at LLM
vocabulary sizes.

Rows of the generation part: ours_ms / baseline_ms are whole generations; the note gives tokens/s, steps, model
calls and the mean tokens unmasked per step and row. The model's weights are random, so its confidences -- and
with them how many tokens each step unmasks -- are not those of a trained model: the cache speed-ups per step are
meaningful, the parallel-decoding factor is only indicative. The generation rows check nothing (no tolerance): a
cache changes which tokens come out by design, so there is no reference sequence to hold them to.

Error check of the unmask rows (outside the timed calls), against ``ref_dllm_unmask`` (softmax statistics in fp64):
``max_error`` is the largest relative error ``|confidence - reference| / reference`` over the candidates, or 1 when a
token differs from the reference's argmax or a decision differs from the rule applied to the op's own confidences
(``ref_dllm_select``; both are exact). Tolerance ``unmask_tolerance(V) = 2 u sqrt(V)`` (u = fp32's unit roundoff;
2.1e-5 at V = 32000): the confidence is 1 / (a sum of V exponentials accumulated in fp32 with online rescaling),
whatever the logits' dtype, and such a sum's relative rounding error grows as about ``u sqrt(V) / 3`` (random-walk
model of the partial sums' roundings); the bound is six of those. Measured: up to 6.5e-6 on the portable path
(sequential sums), 6e-7 on AVX2 / AVX-512 (V = 32000 and 126464, fp32 and bf16). tests/test_dllm_ops.py's rtol 2e-6
holds for its own cases, not for the portable path on these peaked logits.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from blockops.bench.harness import Result, time_ms, unit_roundoff
from blockops.bench.tiny_dllm import TinyDiffusionLM
from blockops.dllm import generate, unmask
from blockops.reference import ref_dllm_select, ref_dllm_unmask

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("dllm_unmask", "dllm_kv_overwrite")


def unmask_tolerance(vocab: int) -> float:
    """Largest acceptable relative error of the confidences at vocabulary size `vocab` (see the module docstring)."""
    return 2 * unit_roundoff(torch.float32) * math.sqrt(vocab)


@dataclasses.dataclass(frozen=True)
class GenConfig:
    batch: int
    prompt: int
    gen_length: int
    block_length: int
    vocab: int
    dim: int
    layers: int


@dataclasses.dataclass(frozen=True)
class UnmaskConfig:
    batch: int
    positions: int          # L: the fed window (a block with the dual cache)
    vocab: int
    dtype: torch.dtype


QUICK_GEN = GenConfig(batch=2, prompt=16, gen_length=32, block_length=16, vocab=512, dim=64, layers=2)
FULL_GEN = GenConfig(batch=2, prompt=64, gen_length=128, block_length=32, vocab=4096, dim=128, layers=4)
RULES = {"one per step": dict(threshold=None), "threshold 0.9": dict(threshold=0.9),
         "threshold 0.7": dict(threshold=0.7), "factor 1.0": dict(factor=1.0)}
QUICK_UNMASK = [UnmaskConfig(1, 32, 32000, torch.float32)]
FULL_UNMASK = [UnmaskConfig(b, 32, v, dt) for b in (1, 8) for v in (32000, 126464)
               for dt in (torch.float32, torch.bfloat16)]


def eager_unmask(logits, masked, lo: int, hi: int, threshold: float):
    """Fast-dLLM's eager step: softmax, confidence and argmax, threshold, and the top-1 as the "at least one"."""
    probs = torch.softmax(logits.float(), -1)
    conf, tokens = probs.max(-1)
    pos = torch.arange(logits.shape[1], device=logits.device)
    cand = masked & (pos >= lo) & (pos < hi)
    conf = torch.where(cand, conf, float("-inf"))
    chosen = conf > threshold
    top = conf.topk(1, dim=-1).indices
    chosen = chosen.scatter(1, top, True) & cand
    return tokens, chosen, conf


def _generation_rows(c: GenConfig, device: str, quick: bool) -> list[Result]:
    model = TinyDiffusionLM(vocab_size=c.vocab, dim=c.dim, heads=max(1, c.dim // 64), layers=c.layers,
                            logit_scale=5.0, device=device)
    mask_id = c.vocab - 1
    prompt = torch.randint(0, mask_id, (c.batch, c.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    steps = c.gen_length
    repeats = dict(warmup=1, min_repeats=1 if quick else 3, min_seconds=0.0)

    def run(cache, rule):
        return generate(model, prompt, c.gen_length, c.block_length, steps, cache=cache, mask_id=mask_id, **rule)

    base_ms = time_ms(lambda: run(None, RULES["one per step"]), device, **repeats)
    shape = (f"B={c.batch} prompt={c.prompt} gen={c.gen_length} block={c.block_length} V={c.vocab} "
             f"d={c.dim} layers={c.layers}")
    rows = []
    for cache in (None, "prefix", "dual"):
        for name, rule in RULES.items():
            out = run(cache, rule)
            ms = base_ms if cache is None and name == "one per step" else time_ms(lambda: run(cache, rule), device,
                                                                                    **repeats)
            s = out.stats
            tok_s = c.batch * c.gen_length / (ms * 1e-3)
            note = (f"{tok_s:.0f} tok/s; {s.steps} steps, {s.model_calls} calls, {s.tokens_per_step:.2f} tok/step/row,"
                    f" {s.fed_tokens} tokens fed; masks left {int((out.sequences == mask_id).sum())}")
            rows.append(Result("dllm", f"generate cache={cache or 'none'} {name}", shape, device, ms,
                               "no cache, one per step", base_ms, note=note))   # whole sampler: nothing to check
    return rows


def _unmask_rows(configs, device: str) -> list[Result]:
    rows = []
    for c in configs:
        g = torch.Generator().manual_seed(1)
        logits = (torch.randn(c.batch, c.positions, c.vocab, generator=g) * 4).to(c.dtype).to(device)
        masked = (torch.rand(c.batch, c.positions, generator=g) < 0.8).to(device)
        bounds = torch.tensor([0, c.positions], device=device).expand(c.batch, 2).contiguous()
        ours = unmask(logits, masked, bounds, threshold=0.9)
        tokens, _, conf = ref_dllm_unmask(logits, masked, bounds, threshold=0.9)
        cand = masked
        err = ((ours.confidence[cand].double() - conf[cand].double()).abs() / conf[cand].double()).max().item()
        if not torch.isfinite(ours.confidence[cand]).all():
            err = float("nan")
        same = bool(torch.equal(ours.tokens, tokens)
                    and torch.equal(ours.unmask, ref_dllm_select(ours.confidence, cand, threshold=0.9)))
        ms = time_ms(lambda: unmask(logits, masked, bounds, threshold=0.9), device)
        base = time_ms(lambda: eager_unmask(logits, masked, 0, c.positions, 0.9), device)
        read = logits.numel() * logits.element_size()
        rows.append(Result("dllm", f"unmask {str(c.dtype).replace('torch.', '')}",
                           f"B={c.batch} L={c.positions} V={c.vocab}", device, ms, "eager softmax+max+threshold+topk",
                           base, bytes_moved=read, max_error=err if same else max(err, 1.0),
                           tolerance=unmask_tolerance(c.vocab),
                           note="" if same else "tokens or decisions differ from the reference"))
    return rows


def run(device: str, quick: bool = True) -> list[Result]:
    return (_unmask_rows(QUICK_UNMASK if quick else FULL_UNMASK, device)
            + _generation_rows(QUICK_GEN if quick else FULL_GEN, device, quick))
