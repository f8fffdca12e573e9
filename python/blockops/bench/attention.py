"""Block-sparse attention benchmark: blockops.attention.block_sparse_attention, forward and forward+backward, on the
seed papers' patterns (causal, LongGen sink + window + stride, packed causal documents, block-diffusion training,
Jenga top-k at keep ratios 0.1-0.3), against in the same run:

* dense ``F.scaled_dot_product_attention`` (``is_causal=True`` where the pattern is causal, no mask otherwise): the
  compute a block mask saves;
* ``torch.compile(flex_attention)`` with the same mask (``BlockMask.to_flex()``); forward only on CPU, where
  FlexAttention is inference only. A flex failure (block size, memory) is recorded in the row's note.

TFLOP/s count computed tiles only: ``4 * B * H * tiles * block_q * block_kv * D`` forward, 3.5x that forward+backward
(backward about 2.5x forward). Goals of the issue: on CPU, at T=4096, D=64 and ~15% tile density, a speed-up over
dense SDPA of at least ``0.6 * dense tiles / computed tiles`` (dense tiles: those SDPA computes, half for causal) and
faster than compiled flex; on GPU, >= 400 TFLOP/s bf16 forward at T=16384, D=128. Every SDPA row names its goal
speed-up in the baseline column; notes (JSON) say whether a goal was met, and hold flex failures.

Error check (outside the timed calls), against ``ref_masked_attention`` in fp64 on the same (rounded) inputs and the
exact token mask, for the last queries of batch 0 and the first GQA group of query heads (where masks see the most
keys; up to ``_REF_ROWS`` queries, fewer when ``group x rows x T`` would pass ``_REF_ELEMENTS``): the ``fwd`` rows'
error is ``max |out - ref| / max |ref|``; the ``fwd+bwd`` rows' is the largest of that and the same measure for dq
(those queries), dk and dv (the group's key head), from one extra backward with the output gradient zero outside
those queries. Tolerances are the accuracy contract of tests/test_attention.py (``TOL``; errors relative to the
largest reference value): forward fp32 2e-5 (fp32 accumulation and exp over up to T keys), fp16 4e-3 (~8 u),
bf16 2.5e-2 (~6 u: the output and the probabilities fed to the P.V product are rounded to bf16); the gradients
twice that.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops.attention import BlockMask, block_sparse_attention, masks
from blockops.bench.harness import Result, forward_backward, max_rel_error, time_ms
from blockops.reference import ref_masked_attention

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("block_sparse_attention", "block_sparse_attention_backward")

PATTERNS = ("causal", "longgen", "documents", "block_diffusion", "jenga0.1", "jenga0.2", "jenga0.3")
CAUSAL_PATTERNS = ("causal", "longgen", "documents")      # subsets of the causal mask: SDPA runs is_causal=True


@dataclasses.dataclass(frozen=True)
class Config:
    pattern: str            # one of PATTERNS
    seq_len: int            # T (queries = keys)
    heads: int              # query heads H
    kv_heads: int           # key/value heads (GQA when < heads)
    head_dim: int           # D = Dv
    dtype: torch.dtype
    block: int              # block_q = block_kv
    batch: int = 1


def _grid(lengths, patterns, dtypes, block):
    """H=16 with 16 (MHA) or 4 (GQA) key/value heads, D in {64, 128}, every pattern."""
    return [Config(p, t, 16, hk, d, dt, block) for dt in dtypes for t in lengths for d in (64, 128)
            for hk in (16, 4) for p in patterns]


# CPU quick: ~30-60 s on 2 cores; the ~15% LongGen mask of the CPU goal, plus causal.
QUICK_CPU = [Config(p, 4096, 16, 16, 64, torch.float32, 64) for p in ("longgen", "causal")]
FULL_CPU = _grid((1024, 4096), PATTERNS, (torch.float32, torch.bfloat16), 64)
# The CPU figures of docs/performance.md (a few minutes): every pattern at the goal's shape, then D=128, GQA,
# bf16 and a shorter sequence for the LongGen mask.
DOC_CPU = ([Config(p, 4096, 16, 16, 64, torch.float32, 64)
            for p in ("longgen", "causal", "documents", "block_diffusion", "jenga0.2")]
           + [Config("longgen", 4096, 16, 16, 128, torch.float32, 64),
              Config("longgen", 4096, 16, 4, 64, torch.float32, 64),
              Config("longgen", 4096, 16, 16, 64, torch.bfloat16, 64),
              Config("longgen", 1024, 16, 16, 64, torch.float32, 64)])
QUICK_CUDA = [Config(p, 16384, 16, 16, 128, torch.bfloat16, 128) for p in ("longgen", "causal", "jenga0.2")]
FULL_CUDA = _grid((16384, 65536), PATTERNS, (torch.bfloat16,), 128)

# to_flex() expands the mask to B' * H' * T * T bools; above this (8 G, GPU memory), flex is skipped (and the row
# says so). The error reference checks the last _REF_ROWS queries of the first GQA group (where masks see the most
# keys), fewer when group * rows * T would pass _REF_ELEMENTS (its fp64 scores: 256 MB each).
_DENSE_LIMIT = 1 << 33
_REF_ROWS = 1024
_REF_ELEMENTS = 1 << 25
# Largest acceptable max |ours - ref| / max |ref| of the forward output (tests/test_attention.py's TOL); the
# gradients get twice as much.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _documents(seq_len: int) -> list[int]:
    """Packed documents of 30/10/25/5/30% of the sequence: causal within each, nothing across."""
    lens = [int(f * seq_len) for f in (0.3, 0.1, 0.25, 0.05, 0.3)]
    lens[-1] += seq_len - sum(lens)
    return lens


def make_mask(c: Config, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
    """The pattern's BlockMask for queries q and keys k (Jenga selects from them)."""
    t, blk, dev = c.seq_len, c.block, q.device
    sizes = {"block_q": blk, "block_kv": blk, "device": dev}
    if c.pattern == "causal":
        return masks.causal(t, **sizes)
    if c.pattern == "longgen":      # sink of one block, window T/16, every 6th key block: ~15% of tiles at T=4096
        return masks.sink_window_strided(t, sink=blk, window=t // 16, stride=6, **sizes)
    if c.pattern == "documents":
        return masks.documents(_documents(t), causal=True, **sizes)
    if c.pattern == "block_diffusion":   # training on [x_t ; x_0], diffusion blocks of 16 tokens
        return masks.block_diffusion(16, t // 2, training=True, **sizes)
    if c.pattern.startswith("jenga"):
        return masks.topk_blocks(q, k, keep_ratio=float(c.pattern[len("jenga"):]), block_size=blk)
    raise ValueError(f"unknown pattern {c.pattern!r}; known: {PATTERNS}")


def _shape(c: Config) -> tuple:
    return (c.batch, c.seq_len, c.heads, c.kv_heads, c.head_dim, c.dtype)


def _dense_rows(mask: BlockMask, heads: int, q0: int) -> torch.Tensor:
    """bool ``[heads, q_len - q0, kv_len]``: the token-level mask of batch 0, query heads ``0 .. heads - 1`` (a mask
    broadcast over heads repeats its one head) and queries ``q0 ..``, expanded from the mask's forward lists and bit
    tiles (``to_dense()`` would expand every head and query: 4 G bools at T=16384, H=16)."""
    dev, bq, bk, nkb = mask.device, mask.block_q, mask.block_kv, mask.num_kv_blocks
    qb0 = q0 // bq
    hs = torch.arange(heads, device=dev).clamp(max=mask.kv_num_blocks.shape[1] - 1)
    kb = torch.arange(nkb, device=dev)

    def listed(num, idx, values):
        """Per (head, query block, key block): the listed value, -1 where the key block is not listed."""
        num, idx, values = (t[0][hs][:, qb0:].long() for t in (num, idx, values))
        slot = torch.where(kb < num[..., None], idx, nkb)            # unlisted slots go to a spare column
        out = torch.full((*num.shape, nkb + 1), -1, dtype=torch.long, device=dev)
        return out.scatter_(-1, slot, values)[..., :nkb]

    full = listed(mask.full_kv_num_blocks, mask.full_kv_indices, torch.zeros_like(mask.full_kv_indices)) >= 0
    tile = listed(mask.kv_num_blocks, mask.kv_indices, mask.kv_tile_ids)
    shifts = torch.arange(32, device=dev)
    bits = ((mask.tiles.long()[..., None] >> shifts) & 1).bool().flatten(-2)[..., :bk]   # [tiles, bq, bk]
    if bits.shape[0] == 0:
        bits = torch.zeros(1, bq, bk, dtype=torch.bool, device=dev)
    dense = torch.where((tile >= 0)[..., None, None], bits[tile.clamp_min(0)], full[..., None, None])
    h, nqb = dense.shape[:2]
    dense = dense.permute(0, 1, 3, 2, 4).reshape(h, nqb * bq, nkb * bk)
    return dense[:, q0 - qb0 * bq:mask.q_len - qb0 * bq, :mask.kv_len]


def _errors(c: Config, q, k, v, mask: BlockMask, out) -> tuple[float, float]:
    """(forward error, forward+backward error), see the module docstring."""
    g = c.heads // c.kv_heads
    rows = min(_REF_ROWS, _REF_ELEMENTS // (g * c.seq_len) // c.block * c.block)
    rows = min(c.seq_len, max(c.block, rows))
    q0 = c.seq_len - rows
    dense = _dense_rows(mask, g, q0)[None]
    qr = q[:1, :g, q0:].detach().double().requires_grad_(True)
    kr, vr = (x[:1, :1].detach().double().requires_grad_(True) for x in (k, v))
    ref, _ = ref_masked_attention(qr, kr, vr, dense)
    fwd = max_rel_error(out[:1, :g, q0:], ref)
    # One more forward+backward of ours with the output gradient zero outside the checked queries.
    grad = torch.zeros_like(q)
    grad[:1, :g, q0:] = torch.randn(grad[:1, :g, q0:].shape, generator=torch.Generator().manual_seed(1)).to(grad)
    ours = [x.detach().requires_grad_(True) for x in (q, k, v)]
    block_sparse_attention(*ours, mask).backward(grad)
    ref.backward(grad[:1, :g, q0:].double())
    bwd = [max_rel_error(ours[0].grad[:1, :g, q0:], qr.grad), max_rel_error(ours[1].grad[:1, :1], kr.grad),
           max_rel_error(ours[2].grad[:1, :1], vr.grad)]
    return fwd, max([fwd] + bwd)


def _flex_forward(c: Config, q, k, v, mask: BlockMask):
    """A forward closure of compiled flex_attention on mask.to_flex(), or the reason it cannot run."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h = mask.shape[:2]
    if b * h * c.seq_len ** 2 > _DENSE_LIMIT:
        return None, f"flex skipped: to_flex() would expand {b}x{h}x{c.seq_len}^2 mask bools"
    try:
        flex_mask = mask.to_flex()
        flex = torch.compile(flex_attention)
        fn = lambda: flex(q, k, v, block_mask=flex_mask, enable_gqa=c.heads != c.kv_heads)  # noqa: E731
        fn()
        return fn, ""
    except Exception as e:  # noqa: BLE001 - any compile / launch failure is the measurement: record it
        return None, f"flex failed: {type(e).__name__}: {e}"[:200]


# ---- BlockBERT in a transformers model (attn_implementation="blockops") -------------------------------------------

# The BlockBERT paper's block counts (n = 2, 3), at 512 tokens (all-MiniLM-L6-v2's length: quality and speed) up
# to 4096 (speed; the position embeddings are tiled past 512).
BLOCKBERT_LENGTHS = (512, 1024, 2048, 4096)
BLOCKBERT_BLOCKS = (2, 3)
_BLOCKBERT_DOCS = 4          # documents per length for the embedding cosine (batch of the quality check)


def _minilm_at(length: int, attn: str):
    """all-MiniLM-L6-v2 (the packaged weights) with ``length`` positions (its 512 tiled) and ``attn``."""
    import transformers

    from blockops.quant.pipeline import minilm_dir

    path = minilm_dir()
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
    if length > config.max_position_embeddings:
        old = model.embeddings.position_embeddings.weight.data
        reps = -(-length // old.shape[0])
        new = torch.nn.Embedding(length, old.shape[1])
        new.weight.data.copy_(old.repeat(reps, 1)[:length])
        model.embeddings.position_embeddings = new
        model.embeddings.register_buffer("position_ids", torch.arange(length)[None], persistent=False)
        model.embeddings.register_buffer("token_type_ids", torch.zeros(1, length, dtype=torch.long),
                                         persistent=False)
        model.config.max_position_embeddings = length
    return model


def _pooled(hidden: torch.Tensor) -> torch.Tensor:
    return F.normalize(hidden.mean(1).float(), dim=-1)


def blockbert_rows(device: str = "cpu", lengths=BLOCKBERT_LENGTHS, blocks=BLOCKBERT_BLOCKS,
                   block: int = 64) -> list[Result]:
    """BlockBERT masks (`masks.blockbert`, n blocks, heads split evenly over the n cyclic block permutations) in
    all-MiniLM-L6-v2 (6 layers, 12 heads of D = 32) through ``attn_implementation="blockops"``, against the same
    model with transformers' SDPA attention (dense), batch 1: the whole model's forward time. At each length the
    quality is the cosine between the mean-pooled, normalised embeddings of the BlockBERT and the dense model on
    real text (the evaluation sentences concatenated, repeated past ~10k tokens; meaningful up to 512 tokens, the
    model's trained length).
    The row's error (tolerance 1e-4, fp32 through 6 layers) is against the same model on SDPA with the dense token
    mask, i.e. the backend computes exactly the masked model (checked up to 1024 tokens, where the dense mask stays
    small). Skipped (no rows) when the MiniLM package is missing."""
    import importlib.util

    from blockops.quant import data
    from blockops.quant.pipeline import MINILM_PACKAGE, minilm_dir

    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        return []
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    text = " ".join(data.splits()["eval"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = _BLOCKBERT_DOCS * max(lengths)
    ids = (ids * -(-need // len(ids)))[:need]     # the text repeated when the lengths ask for more tokens
    results = []
    for length in lengths:
        dense = _minilm_at(length, "sdpa").to(device)
        sparse = _minilm_at(length, "blockops").to(device)
        docs = torch.tensor([ids[i * length:(i + 1) * length] for i in range(_BLOCKBERT_DOCS)], device=device)
        one = docs[:1]
        heavy = length >= 2048
        timing = {"warmup": 1, "min_repeats": 3, "min_seconds": 0.0} if heavy else {}
        with torch.no_grad():
            dense_emb = _pooled(dense(input_ids=docs).last_hidden_state)
            dense_ms = time_ms(lambda: dense(input_ids=one), device, **timing)
            for n in blocks:
                mask = masks.blockbert(length, n, dense.config.num_attention_heads, block_q=block, block_kv=block,
                                       device=device)
                out = sparse(input_ids=docs, blockops_mask=mask).last_hidden_state
                cosine = (_pooled(out) * dense_emb).sum(-1)
                err, tol = None, None
                if length <= 1024:
                    ref = dense(input_ids=docs, attention_mask=mask.to_dense()).last_hidden_state
                    err, tol = max_rel_error(out, ref), 1e-4
                ours = time_ms(lambda: sparse(input_ids=one, blockops_mask=mask), device, **timing)
                note = (f"embedding cosine vs dense: mean {cosine.mean().item():.4f}, min {cosine.min().item():.4f} "
                        f"({_BLOCKBERT_DOCS} docs{'; positions tiled past 512' if length > 512 else ''})")
                density = mask.density()
                results.append(Result(
                    "attention", f"BlockBERT n={n} in MiniLM", f"B=1 T={length} L=6 H=12 D=32 fp32 blk={block} "
                    f"tiles={density.tiles:.1%}", device, ours, "MiniLM SDPA (dense)", dense_ms, max_error=err,
                    tolerance=tol, note=note))
    return results


def run(device: str, quick: bool = True, configs: list[Config] | None = None) -> list[Result]:
    """Rows per config: forward vs dense SDPA, forward vs compiled flex, forward+backward vs dense SDPA (and vs
    flex on GPU); the full CPU run adds `blockbert_rows` (BlockBERT in all-MiniLM-L6-v2 vs the dense model). Quick: the CPU goal's shape (LongGen ~15% and causal, T=4096, H=16, D=64, fp32) or, on GPU, the
    TFLOP/s goal's shape (T=16384, D=128, bf16). `configs` overrides the grid (e.g. `DOC_CPU`)."""
    cuda = torch.device(device).type == "cuda"
    if configs is None:
        configs = (QUICK_CUDA if quick else FULL_CUDA) if cuda else (QUICK_CPU if quick else FULL_CPU)
    results: list[Result] = []
    sdpa_ms: dict = {}          # dense SDPA depends on the shape and causality only: time it once per group
    last_shape = None
    for c in configs:
        if _shape(c) != last_shape:
            # One flex compilation per shape; a reset keeps dynamo's recompile limit from silently falling back
            # to eager flex (a dense math path) after many shapes.
            torch._dynamo.reset()
            last_shape = _shape(c)
        results.extend(_run_config(c, device, cuda, sdpa_ms))
    if not quick and configs is None and not cuda:
        results.extend(blockbert_rows(device))
    return results


def _run_config(c: Config, device: str, cuda: bool, sdpa_ms: dict) -> list[Result]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(heads):
        return torch.randn(c.batch, heads, c.seq_len, c.head_dim, device=device, generator=gen, dtype=c.dtype)

    q, k, v = randn(c.heads), randn(c.kv_heads), randn(c.kv_heads)
    mask = make_mask(c, q, k)
    density = mask.density()
    qb = mask.num_q_blocks
    computed_tiles = density.tiles * qb * mask.num_kv_blocks          # per (batch, head), averaged
    causal = c.pattern in CAUSAL_PATTERNS
    dense_tiles = qb * (qb + 1) / 2 if causal else qb * mask.num_kv_blocks
    goal = 0.6 * dense_tiles / computed_tiles
    fwd_flops = 4.0 * c.batch * c.heads * computed_tiles * c.block * c.block * c.head_dim

    fwd_err, both_err = _errors(c, q, k, v, mask, block_sparse_attention(q, k, v, mask))
    dt = str(c.dtype).replace("torch.", "")
    shape = (f"B={c.batch} T={c.seq_len} H={c.heads}/{c.kv_heads} D={c.head_dim} {dt} blk={c.block} "
             f"tiles={density.tiles:.1%} tok={density.tokens:.1%}")
    # Big problems: fewer repeats (each CPU call at T=4096 takes up to seconds); the median of 3 is still robust.
    heavy = c.batch * c.heads * c.seq_len ** 2 * c.head_dim > 2**33 and not cuda
    timing = {"warmup": 1, "min_repeats": 3, "min_seconds": 0.0} if heavy else {}

    def row(op, ours, baseline, base, flops, note=""):
        err, tol = (fwd_err, TOL[c.dtype]) if op == "fwd" else (both_err, 2 * TOL[c.dtype])
        return Result("attention", f"{op} {c.pattern}", shape, device, ours, baseline, base, flops=flops,
                      max_error=err, tolerance=tol, note=note)

    sdpa_kwargs = {"is_causal": causal, "enable_gqa": c.heads != c.kv_heads}
    sdpa_name = f"SDPA {'causal' if causal else 'dense'} (goal {goal:.2f}x)"
    cpu_goal = not cuda and c.seq_len == 4096 and c.head_dim == 64 and abs(density.tiles - 0.15) <= 0.05
    results = []

    ours_fwd = time_ms(lambda: block_sparse_attention(q, k, v, mask), device, **timing)
    key = (_shape(c), causal, "fwd")
    if key not in sdpa_ms:
        sdpa_ms[key] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs), device, **timing)
    base = sdpa_ms[key]
    note = ""
    if cpu_goal:
        note = f"CPU goal >= {goal:.2f}x vs SDPA: {'met' if base / ours_fwd >= goal else 'missed'}"
    if cuda and c.seq_len == 16384 and c.head_dim == 128 and c.dtype == torch.bfloat16:
        tflops = fwd_flops / (ours_fwd * 1e-3) / 1e12
        note = f"GPU goal >= 400 TFLOP/s: {'met' if tflops >= 400 else 'missed'} ({tflops:.0f})"
    results.append(row("fwd", ours_fwd, sdpa_name, base, fwd_flops, note))

    flex_fn, flex_note = _flex_forward(c, q, k, v, mask)
    notes = [] if cuda else ["forward only: flex on CPU is inference-only"]
    if flex_fn is None:
        results.append(row("fwd", ours_fwd, "flex compiled", float("nan"), fwd_flops, "; ".join(notes + [flex_note])))
    else:
        flex_ms = time_ms(flex_fn, device, **timing)
        if cpu_goal:
            notes.append(f"CPU goal faster than flex: {'met' if flex_ms > ours_fwd else 'missed'}")
        results.append(row("fwd", ours_fwd, "flex compiled", flex_ms, fwd_flops, "; ".join(notes)))

    for x in (q, k, v):
        x.requires_grad_(True)
    grad = torch.randn_like(q)
    ours = time_ms(forward_backward(lambda: block_sparse_attention(q, k, v, mask), (q, k, v), grad), device,
                   **timing)
    key = (_shape(c), causal, "fwd+bwd")
    if key not in sdpa_ms:
        sdpa_ms[key] = time_ms(forward_backward(lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs),
                                                 (q, k, v), grad), device, **timing)
    results.append(row("fwd+bwd", ours, sdpa_name, sdpa_ms[key], 3.5 * fwd_flops))
    if cuda and flex_fn is not None:
        flex_ms = time_ms(forward_backward(flex_fn, (q, k, v), grad), device, **timing)
        results.append(row("fwd+bwd", ours, "flex compiled", flex_ms, 3.5 * fwd_flops))
    return results
