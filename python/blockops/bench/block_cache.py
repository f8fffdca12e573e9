"""Cached-block skipping benchmark (family "block_cache").

1. A small DiT built here (patchify, AdaLN-zero blocks, timestep + class conditioning, a flow-matching Euler
   sampler with batched classifier-free guidance), seeded random weights. Per policy and threshold, in one run:
   blocks skipped, wall-time speed-up over the uncached model, the ideal speed-up the skip ratio implies
   (1 / (1 - skipped / total block calls)) and how much of it is reached, and the relative L2 error of the final
   latent against the uncached one. Random weights make the features change less smoothly between steps than a
   trained DiT's, so the skip ratios at a given threshold are lower (and errors higher) than the papers report:
   compare policies with each other here, not with the papers.
2. The fused indicators (``relative_l1_residual``, ``relative_l1``) against the eager PyTorch expressions on the
   same large tensors (target >= 2x).
3. On a tiny randomly initialised diffusers Flux transformer (dual-stream + single-stream blocks, the same
   weights for every method, called step by step as FluxPipeline calls it), in one run: blockops' policies against
   diffusers' own FirstBlockCache (``transformer.enable_cache(FirstBlockCacheConfig)``) and cache-dit's DBCache
   (F1B0, ``cache_dit.enable_cache``) where those packages are installed: cached steps, relative L2 error of the
   final latent against the uncached transformer, wall time, and each library's overhead per step (the same
   method at threshold 0, which never skips, minus the uncached step). Rows are left out when diffusers is
   missing; cache-dit's when cache-dit is.
4. Caching overhead at DiT-XL sizes (hidden 1152, 256 tokens; 64 in the quick run): what BWCache adds to a
   computed block (fused indicator + residual, output cache copy, the Python wrapper) against the block's own time
   (target < 10%).

Error checks (outside the timed calls), against ``blockops.reference`` (indicators in fp64):
* indicator rows: ``|indicator - ref| / ref``, and for ``relative_l1_residual`` 1 (the error's whole scale) when the
  residual differs from ``ref_relative_l1_residual``'s in any bit (it is one fp32 subtraction rounded once, as the
  reference's); tolerance 2e-6, tests/test_block_cache.py's: fp32 partial sums over fixed chunks, fp64 across them.
* the overhead row: the same measure for one untimed indicator + residual + ``cache_update`` on its tensors (the
  indicator of a block's output against itself is exactly 0, the copy and the residual bit-exact); tolerance 2e-6.
* DiT sampling rows check nothing (no tolerance): their ``max_error`` column holds the relative L2 error of the
  final latent against the uncached sampler's, what the policy costs in quality, not a kernel's error.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import blockops.block_cache as bc
from blockops.bench.harness import Result, time_ms
from blockops.reference import ref_relative_l1, ref_relative_l1_residual

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("relative_l1", "relative_l1_residual", "apply_residual", "cache_update")

# Largest acceptable indicator error |indicator - ref| / ref (see the module docstring).
INDICATOR_TOL = 2e-6


def _indicator_error(got: torch.Tensor, want: torch.Tensor, exact_pairs=()) -> float:
    """|got - want| / |want| (|got| when want is 0); 1 when a pair of `exact_pairs` differs in any bit."""
    got, want = got.double().cpu().item(), want.double().cpu().item()
    err = abs(got - want) / abs(want) if want != 0 else abs(got)
    if got != got:
        err = float("nan")
    return max([err] + [1.0 for a, b in exact_pairs if not torch.equal(a, b)])


# ---------------------------------------------------------------------------------------------------------
# A small DiT
# ---------------------------------------------------------------------------------------------------------

def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning: ``x + gate * attn(modulate(norm(x)))``, then the same for the MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden, int(hidden * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden * mlp_ratio), hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def modulated_input(self, x, c):
        """What TeaCache compares: the first norm's output modulated by the conditioning."""
        shift, scale = self.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return _modulate(self.norm1(x), shift, scale)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        b, t, d = x.shape
        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + gate_msa.unsqueeze(1) * self.proj(a)
        h = _modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def _timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyDiT(nn.Module):
    """Latent [B, C, H, W] -> patch tokens -> ``blocks`` -> adaLN final layer -> velocity [B, C, H, W]."""

    def __init__(self, channels=4, size=16, patch=2, hidden=256, depth=8, heads=4, num_classes=10, seed=0):
        super().__init__()
        self.channels, self.size, self.patch, self.hidden = channels, size, patch, hidden
        self.num_classes = num_classes
        self.patchify = nn.Conv2d(channels, hidden, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, hidden))
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # the last class is the CFG null class
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch * patch * channels)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # seeded random weights, adaLN included (zero-init would make blocks identity)
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.01))
            self.pos.copy_(torch.randn(self.pos.shape, generator=g) * 0.1)

    def forward(self, x, t, y):
        b = x.shape[0]
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(_timestep_embedding(t, 256)) + self.y_embed(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_mod(c).chunk(2, dim=1)
        h = self.final(_modulate(self.final_norm(h), shift, scale))
        n, p = self.size // self.patch, self.patch
        h = h.view(b, n, n, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.channels, self.size, self.size)


def sample(model: TinyDiT, noise, labels, steps: int, cfg_scale: float = 4.0):
    """Flow-matching Euler sampler from t = 1 (noise) to t = 0, classifier-free guidance with both branches in
    one batch ([cond; uncond]); one model call per step."""
    x = noise
    null = torch.full_like(labels, model.num_classes)
    y = torch.cat([labels, null])
    for i in range(steps):
        t = torch.full((2 * x.shape[0],), 1.0 - i / steps, device=x.device)
        v_cond, v_uncond = model(torch.cat([x, x]), t, y).chunk(2)
        x = x - (v_uncond + cfg_scale * (v_cond - v_uncond)) / steps
    return x


def teacache_input(block, args, kwargs):
    """TeaCache's compared tensor for DiTBlock: block 0's modulated input."""
    return block.modulated_input(args[0], args[1])


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DiTConfig:
    hidden: int
    depth: int
    heads: int
    size: int       # latent H = W (patch 2)
    batch: int
    steps: int


QUICK_DIT = DiTConfig(hidden=64, depth=4, heads=2, size=8, batch=1, steps=8)
FULL_DIT = DiTConfig(hidden=256, depth=8, heads=4, size=16, batch=1, steps=30)   # sized for 2 CPU cores


def _policies(quick: bool, steps: int):
    fb = [0.05, 0.1] if quick else [0.05, 0.08, 0.12, 0.2]
    tea = [0.1] if quick else [0.1, 0.25, 0.4]
    bw = [0.15] if quick else [0.1, 0.15, 0.25]
    out = [(f"FirstBlockCache({t})", bc.FirstBlockCache(t)) for t in fb]
    out += [(f"TeaCache({t})", bc.TeaCache(t, modulated_input=teacache_input)) for t in tea]
    out += [(f"BWCache({t})", bc.BWCache(t)) for t in bw]
    return out


def _generation(model, noise, labels, steps):
    with torch.inference_mode():
        return sample(model, noise, labels, steps)


def _bac_policy(model, noise, labels, steps, updates):
    """BAC: record every block's features once, fit the per-block schedule (even blocks treated as FFN-like for
    the Bubbling Union: DiT blocks are not split into sub-blocks here)."""
    recorder = bc.RecordFeatures()
    bc.enable_block_cache(model, recorder)
    with bc.cache_context(model, num_steps=steps):
        _generation(model, noise, labels, steps)
    bc.disable_block_cache(model)
    return bc.BACSchedule.fit(recorder.similarities(), updates, ffn_blocks=range(0, len(model.blocks), 2), bubble=1)


def dit_rows(device: str, c: DiTConfig, quick: bool) -> list[Result]:
    torch.manual_seed(0)
    model = TinyDiT(hidden=c.hidden, depth=c.depth, heads=c.heads, size=c.size).to(device).eval()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(c.batch, 4, c.size, c.size, generator=g).to(device)
    labels = torch.randint(0, 10, (c.batch,), generator=g).to(device)
    reference = _generation(model, noise, labels, c.steps)
    repeats = dict(warmup=1, min_repeats=2, min_seconds=0.0) if quick else dict(warmup=1, min_repeats=3, min_seconds=1.0)
    base_ms = time_ms(lambda: _generation(model, noise, labels, c.steps), device, **repeats)
    shape = f"DiT h{c.hidden} d{c.depth} {(c.size // 2) ** 2} tok B={c.batch}x2(CFG) {c.steps} steps"
    policies = _policies(quick, c.steps)
    policies.append((f"BAC({c.steps // 3} upd)", _bac_policy(model, noise, labels, c.steps, c.steps // 3)))
    rows = []
    for name, policy in policies:
        cache = bc.enable_block_cache(model, policy)

        def run():
            with bc.cache_context(model, num_steps=c.steps):
                return _generation(model, noise, labels, c.steps)

        out = run()
        counts = cache.counters()
        skipped, total = sum(counts["skipped"]), sum(counts["skipped"]) + sum(counts["computed"])
        ms = time_ms(run, device, **repeats)
        bc.disable_block_cache(model)
        err = ((out.double() - reference.double()).norm() / reference.double().norm()).item()
        ratio = skipped / total
        ideal = 1.0 / max(1e-9, 1.0 - ratio)
        speedup = base_ms / ms
        note = f"skipped {skipped}/{total} ({ratio:.0%}), ideal {ideal:.2f}x, reached {speedup / ideal:.0%}"
        rows.append(Result("block_cache", f"DiT sampling {name}", shape, device, ms, "no cache", base_ms,
                           max_error=err, note=note))   # whole sampler: a quality figure, no tolerance
    return rows


def indicator_rows(device: str, quick: bool, shapes: list[tuple[int, int, int]] | None = None) -> list[Result]:
    """Fused indicator rows (fp32 and bf16) at the quick or full shapes [B, T, C], or at `shapes` when given."""
    rows = []
    if shapes is None:
        shapes = [(2, 256, 1152)] if quick else [(2, 4096, 1152), (8, 4096, 1152), (2, 16384, 1152)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            g = torch.Generator().manual_seed(0)
            x, out, ref = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
            residual = torch.empty_like(x)

            def fused():
                return bc.relative_l1_residual(out, x, ref, residual, 1, False, True)

            def eager():
                r = out - x
                return (r.float() - ref.float()).abs().sum() / ref.float().abs().sum(), r

            got = fused()
            want, want_residual = ref_relative_l1_residual(out, x, ref, 1, False, True)
            err = _indicator_error(got, want, [(residual, want_residual)])
            ours, base = time_ms(fused, device), time_ms(eager, device)
            moved = x.numel() * x.element_size() * 4  # read out, x, ref; write the residual
            tag = str(dtype).replace("torch.", "")
            note = f"target >= 2x: {'met' if base / ours >= 2 else 'missed'}"
            rows.append(Result("block_cache", f"relative_l1_residual {tag}", "x".join(map(str, shape)), device, ours,
                               "eager (out-in, |r-ref|.sum()/|ref|.sum())", base, bytes_moved=moved,
                               max_error=err, tolerance=INDICATOR_TOL, note=note))

            err = _indicator_error(bc.relative_l1(out, ref), ref_relative_l1(out, ref))
            ours = time_ms(lambda: bc.relative_l1(out, ref), device)
            base = time_ms(lambda: (out.float() - ref.float()).abs().sum() / ref.float().abs().sum(), device)
            rows.append(Result("block_cache", f"relative_l1 {tag}", "x".join(map(str, shape)), device, ours,
                               "eager |a-b|.sum()/|b|.sum()", base, bytes_moved=x.numel() * x.element_size() * 2,
                               max_error=err, tolerance=INDICATOR_TOL,
                               note=f"target >= 2x: {'met' if base / ours >= 2 else 'missed'}"))
    return rows


class _PassThrough(nn.Module):
    """A block that costs nothing: wrapping it measures the wrapper's own Python cost."""

    def forward(self, x, c):
        return x


def overhead_rows(device: str, quick: bool) -> list[Result]:
    """BWCache's cost per computed block at DiT-XL sizes (hidden 1152, 256 tokens, batch 2 = one CFG pair; the
    quick run uses 64 tokens and batch 1) vs the block itself: the fused ``relative_l1_residual`` + the cached
    output's ``cache_update`` + the wrapper's Python cost (a pass-through block, wrapped minus raw)."""
    hidden, heads = 1152, 16
    tokens, batch = (64, 1) if quick else (256, 2)
    torch.manual_seed(0)
    block = DiTBlock(hidden, heads).to(device).eval()
    x = torch.randn(batch, tokens, hidden, device=device)
    cond = torch.randn(batch, hidden, device=device)
    reps = dict(warmup=1, min_repeats=2, min_seconds=0.0) if quick else dict(min_repeats=20, min_seconds=2.0)
    with torch.inference_mode():
        out = block(x, cond)
        h, r = out.clone(), torch.empty_like(out)
        # The check, on its own buffers: indicator + residual against the cached output, then a copy into a stale cache.
        stale, residual = torch.zeros_like(out), torch.empty_like(out)
        indicator = bc.relative_l1_residual(out, x, h, residual)
        bc.cache_update(stale, out)
        want, want_residual = ref_relative_l1_residual(out, x, h)
        err = _indicator_error(indicator, want, [(residual, want_residual), (stale, out)])
        raw_ms = time_ms(lambda: block(x, cond), device, **reps)
        ops_ms = time_ms(lambda: (bc.relative_l1_residual(out, x, h, r), bc.cache_update(h, out)), device, **reps)
        trivial = nn.ModuleList([_PassThrough(), _PassThrough()])
        bare_ms = time_ms(lambda: trivial[0](x, cond), device, min_repeats=200, min_seconds=0.1)
        bc.enable_block_cache(trivial, bc.Never())
        with bc.cache_context(trivial):
            wrapped_ms = time_ms(lambda: trivial[0](x, cond), device, min_repeats=200, min_seconds=0.1)
        bc.disable_block_cache(trivial)
    wrapper_ms = max(0.0, wrapped_ms - bare_ms)
    overhead = (ops_ms + wrapper_ms) / raw_ms
    note = (f"indicator+copy {ops_ms:.3f} ms + wrapper {wrapper_ms:.3f} ms = {overhead:.1%} of the block; "
            f"target < 10%: {'met' if overhead < 0.10 else 'missed'}")
    return [Result("block_cache", "BWCache overhead per computed block", f"DiT-XL block B={batch} T={tokens} "
                   f"D={hidden}", device, raw_ms + ops_ms + wrapper_ms, "the block alone", raw_ms, max_error=err,
                   tolerance=INDICATOR_TOL, note=note)]


# ---------------------------------------------------------------------------------------------------------
# Against diffusers' FirstBlockCache and cache-dit's DBCache on a diffusers Flux transformer
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FluxConfig:
    dual: int       # FluxTransformerBlock (dual-stream) count
    single: int     # FluxSingleTransformerBlock count
    heads: int
    head_dim: int
    side: int       # latent tokens = side * side (patch 1, 16 channels)
    text: int       # text tokens
    steps: int


QUICK_FLUX = FluxConfig(dual=2, single=4, heads=2, head_dim=16, side=8, text=8, steps=8)
FULL_FLUX = FluxConfig(dual=4, single=8, heads=4, head_dim=32, side=16, text=32, steps=20)


def _flux_model(c: FluxConfig, device):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=c.dual, num_single_layers=c.single,
                                             attention_head_dim=c.head_dim, num_attention_heads=c.heads,
                                             joint_attention_dim=32, pooled_projection_dim=32,
                                             axes_dims_rope=[c.head_dim // 4, c.head_dim // 4, c.head_dim // 2])
    return model.to(device).eval()


def _flux_inputs(c: FluxConfig, device):
    g = torch.Generator().manual_seed(1)
    n = c.side * c.side
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n) // c.side, torch.arange(n) % c.side
    return dict(x=torch.randn(1, n, 16, generator=g), text=torch.randn(1, c.text, 32, generator=g),
                pooled=torch.randn(1, 32, generator=g), img_ids=img_ids, txt_ids=torch.zeros(c.text, 3))


def _flux_generation(model, inp, steps, device):
    """FluxPipeline's loop, reduced: one transformer call per step inside ``cache_context("cond")`` (which
    diffusers' cache hooks require), Euler flow matching from t = 1 to 0, then the end-of-call reset that
    ``maybe_free_model_hooks`` does."""
    x = inp["x"].to(device)
    with torch.inference_mode():
        for i in range(steps):
            t = torch.full((1,), 1.0 - i / steps, device=device)
            with model.cache_context("cond"):
                v = model(hidden_states=x, encoder_hidden_states=inp["text"].to(device),
                          pooled_projections=inp["pooled"].to(device), timestep=t, img_ids=inp["img_ids"].to(device),
                          txt_ids=inp["txt_ids"].to(device)).sample
            x = x - v / steps
    model._reset_stateful_cache()
    return x


class _CallCounter:
    """Computed calls of the last block: calls of its output projection, which a skipped block never reaches
    (every library here skips inside the block's forward, so the block's own __call__ runs either way)."""

    def __init__(self, block):
        self.calls = 0
        self.handle = block.proj_out.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))


def _flux_methods(quick: bool, steps: int):
    """(library, name, threshold-0 twin for the overhead, how to enable): blockops' policies, diffusers'
    FirstBlockCache, cache-dit's DBCache F1B0 (skip blocks 1..N-1 when block 0's residual changed less than
    the threshold: the same rule as blockops' and diffusers' first-block cache)."""
    import blockops.cache as bcache

    def blockops(policy):
        return lambda m: bcache.enable(m, policy)

    def diffusers_fbc(threshold):
        def enable(m):
            from diffusers import FirstBlockCacheConfig
            m.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return enable

    def cache_dit_db(threshold):
        def enable(m):
            import cache_dit
            cache_dit.enable_cache(m, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=1,
                num_inference_steps=steps))
        return enable

    thresholds = [0.1, 0.3] if quick else [0.1, 0.3, 0.5]
    out = []
    for t in thresholds:
        out.append(("blockops", f"FirstBlockCache({t})", blockops(bc.FirstBlockCache(t, warmup_steps=1))))
        out.append(("diffusers", f"diffusers FirstBlockCache({t})", diffusers_fbc(t)))
        out.append(("cache-dit", f"cache-dit DBCache F1B0({t})", cache_dit_db(t)))
    t = thresholds[-1]
    out.append(("blockops", f"FirstBlockCache({t}) + forecast 1", blockops(bc.FirstBlockCache(t, warmup_steps=1,
                                                                                             forecast_order=1))))
    out.append(("blockops", f"FirstBlockCache({t}) max 2 in a row", blockops(bc.FirstBlockCache(t, warmup_steps=1,
                                                                                                max_consecutive=2))))
    out.append(("blockops", "TeaCache(0.3)", blockops(bc.TeaCache(0.3, warmup_steps=1))))
    for order in (1, 2):
        out.append(("blockops", f"TaylorSeer(interval 3, order {order})", blockops(bc.TaylorSeer(3, order))))
    overhead = {"blockops": blockops(bc.FirstBlockCache(0.0)), "diffusers": diffusers_fbc(0.0),
                "cache-dit": cache_dit_db(0.0)}
    return out, overhead


def peer_rows(device: str, c: FluxConfig, quick: bool) -> list[Result]:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return []
    try:
        import cache_dit  # noqa: F401
        have_cache_dit = True
    except ImportError:
        have_cache_dit = False
    import copy

    threads = torch.get_num_threads()
    if device == "cpu":   # a tiny model: more threads only add contention on a shared machine
        torch.set_num_threads(1)
    try:
        return _peer_rows(device, c, quick, have_cache_dit, copy)
    finally:
        torch.set_num_threads(threads)


def _peer_rows(device, c, quick, have_cache_dit, copy):
    base = _flux_model(c, device)
    inp = _flux_inputs(c, device)
    reps = dict(warmup=1, min_repeats=2, min_seconds=0.0) if quick else dict(warmup=1, min_repeats=3, min_seconds=1.0)
    reference = _flux_generation(base, inp, c.steps, device)
    base_ms = time_ms(lambda: _flux_generation(base, inp, c.steps, device), device, **reps)
    methods, overhead_methods = _flux_methods(quick, c.steps)
    shape = (f"diffusers Flux {c.dual}+{c.single} blocks h{c.heads * c.head_dim} {c.side * c.side}+{c.text} tok "
             f"{c.steps} steps" + (" (1 thread)" if device == "cpu" else ""))

    def measure(enable):
        model = copy.deepcopy(base)   # the same weights, no hooks from another library
        enable(model)
        counter = _CallCounter(model.single_transformer_blocks[-1])
        out = _flux_generation(model, inp, c.steps, device)
        computed = counter.calls
        cache = getattr(model, "_blockops_block_cache", None)
        cached = cache.cached_steps("cond") if cache is not None else None
        ms = time_ms(lambda: _flux_generation(model, inp, c.steps, device), device, **reps)
        counter.handle.remove()
        return out, ms, computed, cached

    per_step = {}
    for lib, enable in overhead_methods.items():
        if lib == "cache-dit" and not have_cache_dit:
            continue
        _, ms, computed, _ = measure(enable)
        # Against an uncached generation timed right after (the machine's load drifts between rows).
        again_ms = time_ms(lambda: _flux_generation(base, inp, c.steps, device), device, **reps)
        per_step[lib] = (ms - again_ms) / c.steps if computed == c.steps else float("nan")
    rows = []
    for lib, name, enable in methods:
        if lib == "cache-dit" and not have_cache_dit:
            continue
        out, ms, computed, cached = measure(enable)
        err = ((out.double() - reference.double()).norm() / reference.double().norm()).item()
        ov = per_step.get(lib, float("nan"))
        steps_note = f" {cached}" if cached is not None else ""
        note = (f"{lib}: {c.steps - computed}/{c.steps} steps cached{steps_note}; overhead per step "
                f"{ov:.3f} ms ({ov / (base_ms / c.steps):.1%} of an uncached step)")
        rows.append(Result("block_cache", f"Flux sampling {name}", shape, device, ms, "uncached transformer", base_ms,
                           max_error=err, note=note))   # a quality figure, no tolerance
    return rows


def run(device: str, quick: bool = True) -> list[Result]:
    rows = indicator_rows(device, quick)
    rows += overhead_rows(device, quick)
    rows += dit_rows(device, QUICK_DIT if quick else FULL_DIT, quick)
    rows += peer_rows(device, QUICK_FLUX if quick else FULL_FLUX, quick)
    return rows
