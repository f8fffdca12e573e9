"""Generalized 3D Hilbert ("Gilbert") token order for video latents, with its inverse.

Jenga and similar video-DiT methods reorder the ``t x h x w`` latent tokens along a space-filling curve so that
tokens close on the curve are close in space-time; a block of 64..128 consecutive tokens is then a compact 3D
brick, which makes block-sparse attention effective.

The curve follows the recursive splits of Jakub Červený's generalized Hilbert curve (gilbert3d: split the
longest axis, or the box into 3 or 5 sub-boxes, each traversed from one corner to the neighbouring corner
along one of its axes) for any extents, not only powers of two. Where the classic gilbert3d takes a diagonal
step (odd extents), this version picks among the nearby split positions and split kinds one for which every
sub-box has a corner-to-corner path with unit steps, using an exact parity criterion memoised per box shape.
The result: consecutive tokens on the curve are always grid neighbours (Manhattan distance 1).

Index convention: tokens are numbered in the raster order of a ``[t, h, w]`` tensor (``i = (ti * h + yi) * w
+ xi``, i.e. ``x.reshape(..., t * h * w, ...)``). ``perm = hilbert_order(t, h, w)`` lists raster indices in
curve order: ``x_curve = x_raster[perm]``.
"""
from __future__ import annotations

import functools
import sys

import torch

__all__ = ["hilbert_coords", "hilbert_order", "inverse_permutation", "reorder", "restore"]

# A sub-problem is (p, a, b, c): start corner p and three signed axis vectors; the box is
# p + [0, |a|) u_a + [0, |b|) u_b + [0, |c|) u_c and the path must go from p to p + (|a| - 1) u_a.
Vec = tuple[int, int, int]


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


def _len(v: Vec) -> int:
    return abs(v[0] + v[1] + v[2])


def _unit(v: Vec) -> Vec:
    return (_sgn(v[0]), _sgn(v[1]), _sgn(v[2]))


def _add(*vs: Vec) -> Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _neg(v: Vec) -> Vec:
    return (-v[0], -v[1], -v[2])


def _scale(v: Vec, n: int) -> Vec:
    """The vector along v's axis, same direction, of length n."""
    u = _unit(v)
    return (u[0] * n, u[1] * n, u[2] * n)


def _pieces(kind: str, p: Vec, a: Vec, b: Vec, c: Vec, sa: int, sb: int, sc: int):
    """Sub-problems of one split, in path order (gilbert3d's split geometry).

    ``sa``/``sb``/``sc``: lengths of the first part along a / b / c (unused ones ignored).
    kinds: "a" splits a only (2 pieces); "ab" splits a and b, keeps c (3 pieces); "ac" splits a and c, keeps b
    (3 pieces); "abc" splits all three (5 pieces).
    """
    ua, ub, uc = _unit(a), _unit(b), _unit(c)
    a2, b2, c2 = _scale(a, sa), _scale(b, sb), _scale(c, sc)
    a_rest, b_rest, c_rest = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))
    last_a = _add(a, _neg(ua))          # offset of the last cell along a
    if kind == "a":
        return [(p, a2, b, c), (_add(p, a2), a_rest, b, c)]
    if kind == "ab":
        return [
            (p, b2, c, a2),
            (_add(p, b2), a, b_rest, c),
            (_add(p, last_a, b2, _neg(ub)), _neg(b2), c, _neg(a_rest)),
        ]
    if kind == "ac":
        return [
            (p, c2, a2, b),
            (_add(p, c2), a, b, c_rest),
            (_add(p, last_a, c2, _neg(uc)), _neg(c2), _neg(a_rest), b),
        ]
    # "abc"
    last_c = _add(c, _neg(uc))
    return [
        (p, b2, c2, a2),
        (_add(p, b2), c, a2, b_rest),
        (_add(p, b2, _neg(ub), last_c), a, _neg(b2), _neg(c_rest)),
        (_add(p, last_a, b2, last_c), _neg(c), _neg(a_rest), b_rest),
        (_add(p, last_a, b2, _neg(ub)), _neg(b2), c2, _neg(a_rest)),
    ]


def _cuts(n: int) -> list[int]:
    """Candidate lengths of the first part when splitting n (near the half, even first, like gilbert)."""
    half = n // 2
    cands = [half + 1, half, half - 1, half + 2] if half % 2 else [half, half + 1, half - 1, half + 2]
    return [s for s in dict.fromkeys(cands) if 1 <= s < n]


def _kinds(w: int, h: int, d: int) -> list[str]:
    """Split kinds to try, gilbert3d's preferred one first."""
    if 2 * w > 3 * h and 2 * w > 3 * d:
        first = "a"
    elif 3 * h > 4 * d:
        first = "ab"
    elif 3 * d > 4 * h:
        first = "ac"
    else:
        first = "abc"
    return [first] + [k for k in ("abc", "ab", "ac", "a") if k != first]


def _trivial(w: int, h: int, d: int) -> bool:
    return h == 1 and d == 1


@functools.lru_cache(maxsize=None)
def _plan(w: int, h: int, d: int):
    """(kind, sa, sb, sc) of a split of a w x h x d box (path along w) whose pieces all have a plan, "line" for
    a straight run, or None when no unit-step corner-to-corner path is found."""
    if _trivial(w, h, d):
        return ("line", 0, 0, 0)
    if w == 1:
        return None      # start and end coincide in a box of more than one cell
    for kind in _kinds(w, h, d):
        sbs = _cuts(h) if kind in ("ab", "abc") else [0]
        scs = _cuts(d) if kind in ("ac", "abc") else [0]
        for sa in _cuts(w):
            for sb in sbs:
                for sc in scs:
                    pieces = _pieces(kind, (0, 0, 0), (w, 0, 0), (0, h, 0), (0, 0, d), sa, sb, sc)
                    if all(_len(pa) * _len(pb) * _len(pc) == 1 or _plan(_len(pa), _len(pb), _len(pc))
                           for _, pa, pb, pc in pieces):
                        return (kind, sa, sb, sc)
    return None


def _walk(p: Vec, a: Vec, b: Vec, c: Vec, out: list) -> None:
    w, h, d = _len(a), _len(b), _len(c)
    if w * h * d == 1:
        out.append(p)
        return
    kind, sa, sb, sc = _plan(w, h, d)
    if kind == "line":
        ua = _unit(a)
        out.extend((p[0] + i * ua[0], p[1] + i * ua[1], p[2] + i * ua[2]) for i in range(w))
        return
    for piece in _pieces(kind, p, a, b, c, sa, sb, sc):
        _walk(*piece, out)


def _snake(t: int, h: int, w: int) -> list:
    """Boustrophedon order (always unit steps); fallback when no curve plan exists (not expected)."""
    out = []
    for ti in range(t):
        rows = range(h) if ti % 2 == 0 else range(h - 1, -1, -1)
        for k, yi in enumerate(rows):
            cols = range(w) if (ti * h + k) % 2 == 0 else range(w - 1, -1, -1)
            out.extend((ti, yi, xi) for xi in cols)
    return out


@functools.lru_cache(maxsize=16)
def _coords(t: int, h: int, w: int) -> torch.Tensor:
    ext = (t, h, w)
    axes = sorted(range(3), key=lambda i: -ext[i])      # path along the longest axis that has a plan
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for major in axes:
            rest = [j for j in axes if j != major]
            vec = lambda j: tuple(ext[j] if k == j else 0 for k in range(3))  # noqa: E731
            if _plan(ext[major], ext[rest[0]], ext[rest[1]]) is not None or t * h * w == 1:
                out: list = []
                _walk((0, 0, 0), vec(major), vec(rest[0]), vec(rest[1]), out)
                break
        else:
            out = _snake(t, h, w)
    finally:
        sys.setrecursionlimit(limit)
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)


def hilbert_coords(t: int, h: int, w: int) -> torch.Tensor:
    """int64 ``[t * h * w, 3]``: the ``(ti, yi, xi)`` grid cell of each position along the curve (CPU)."""
    for name, n in (("t", t), ("h", h), ("w", w)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"hilbert_coords: {name} must be a positive int, got {n!r}")
    return _coords(t, h, w).clone()


def hilbert_order(t: int, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation along a generalized 3D Hilbert curve of a ``t x h x w`` token grid.

    Returns:
        int64 ``[t * h * w]``: ``perm[i]`` is the raster index (``(ti * h + yi) * w + xi``) of the i-th token along
        the curve; consecutive entries are grid neighbours (Manhattan distance 1) for every extent. Use
        :func:`reorder` / :func:`restore` to apply it and undo it.
    """
    xyz = hilbert_coords(t, h, w)
    perm = (xyz[:, 0] * h + xyz[:, 1]) * w + xyz[:, 2]
    return perm.to(device) if device is not None else perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (int64, perm's device)."""
    inv = torch.empty_like(perm, dtype=torch.int64)
    inv[perm.long()] = torch.arange(perm.numel(), device=perm.device, dtype=torch.int64)
    return inv


def reorder(x: torch.Tensor, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Tokens of x (raster order along `dim`, e.g. ``[B, H, T, D]`` with dim=-2) put in curve order."""
    return x.index_select(dim, perm.to(x.device))


def restore(x: torch.Tensor, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`reorder`: tokens in curve order along `dim` back to raster order."""
    return x.index_select(dim, inverse_permutation(perm.to(x.device)))
