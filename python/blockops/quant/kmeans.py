"""k-means for vector quantization (the codebooks of :meth:`blockops.nn.VQLinear.from_linear`, the candidate
distances of VQ4DiT calibration in blockops/quant/vq4dit.py): Lloyd's iterations with k-means++ seeding,
deterministic for a seed, chunked so that the distance matrix bounds memory."""
from __future__ import annotations

import torch


def _squared_distances(vectors, centroids, centroid_norms):
    """``[N, k]`` squared Euclidean distances through one matmul (``|v|^2 - 2 v.c + |c|^2``; may round slightly
    below zero). ``centroid_norms``: ``(centroids ** 2).sum(1)``, computed once by callers that loop over chunks."""
    return (vectors * vectors).sum(1, keepdim=True) - 2 * vectors @ centroids.t() + centroid_norms


def _nearest(vectors, centroids, chunk_size, accumulate=False):
    """Nearest centroid per vector (and, with accumulate, per-centroid sums and counts), ``chunk_size`` vectors
    at a time so that the [chunk, k] distance matrix bounds memory. Sums go through a one-hot matmul, which
    is deterministic on every device (index_add_ uses atomics on CUDA)."""
    k = centroids.shape[0]
    c_norm = (centroids * centroids).sum(1)
    codes = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    err = torch.zeros((), dtype=torch.float64, device=vectors.device)
    sums = torch.zeros_like(centroids) if accumulate else None
    counts = torch.zeros(k, dtype=vectors.dtype, device=vectors.device) if accumulate else None
    for s in range(0, vectors.shape[0], chunk_size):
        v = vectors[s:s + chunk_size]
        dist = _squared_distances(v, centroids, c_norm)
        best, idx = dist.min(1)
        codes[s:s + chunk_size] = idx
        err += best.clamp_min(0).double().sum()
        if accumulate:
            onehot = torch.nn.functional.one_hot(idx, k).to(v.dtype)
            sums += onehot.t() @ v
            counts += onehot.sum(0)
    return codes, err, sums, counts


def kmeans(vectors: torch.Tensor, k: int, iters: int = 25, seed: int = 0, chunk_size: int = 16384):
    """Lloyd's k-means with k-means++ initialisation on ``vectors [N, d]`` (any float dtype; computed in fp32
    on the input's device), deterministic for a given seed.

    Returns ``(centroids [k, d] fp32, codes [N] int64, sse)``: codes are each vector's nearest centroid and
    ``sse`` (a float) the sum of squared distances to them. Empty clusters keep their centroid. Distances are
    computed ``chunk_size`` vectors at a time. Lloyd's iterations never increase ``sse``. The k-means++ seeding
    picks the k centres one after another (k passes of O(N d)), which dominates for k in the tens of thousands.
    """
    if vectors.dim() != 2:
        raise ValueError(f"kmeans: vectors must be [N, d], got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= N = {n}, got k = {k}")
    v = vectors.detach().float().contiguous()
    gen = torch.Generator(device=v.device)
    gen.manual_seed(seed)
    # k-means++: each next centre drawn with probability proportional to the squared distance to the nearest
    # centre chosen so far (inverse-CDF sampling in fp64: multinomial is limited to 2^24 categories).
    centroids = torch.empty(k, v.shape[1], device=v.device)
    first = torch.randint(n, (1,), generator=gen, device=v.device)
    centroids[0] = v[first[0]]
    min_d = ((v - centroids[0]) ** 2).sum(1).double()
    for i in range(1, k):
        cdf = min_d.cumsum(0)
        u = torch.rand(1, generator=gen, device=v.device, dtype=torch.float64) * cdf[-1]
        pick = torch.searchsorted(cdf, u).clamp_max(n - 1)
        centroids[i] = v[pick[0]]
        min_d = torch.minimum(min_d, ((v - centroids[i]) ** 2).sum(1).double())
    for _ in range(iters):
        _, _, sums, counts = _nearest(v, centroids, chunk_size, accumulate=True)
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    codes, err, _, _ = _nearest(v, centroids, chunk_size)
    return centroids, codes, err.item()
