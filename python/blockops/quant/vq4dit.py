"""VQ4DiT calibration of vector-quantized blocks against their full-precision teacher, without data.

VQ4DiT (Deng et al., 2024) starts from k-means (each weight sub-vector takes its nearest codeword, see
:meth:`blockops.nn.VQLinear.from_linear`) and then learns which codeword each sub-vector should take, because the
nearest codeword for the *weight* is often not the best one for the block's *output*. Per ``VQLinear``:

1. Candidate sets: each sub-vector (of the weight divided by its row scale) keeps its ``n`` nearest codewords
   (:func:`candidate_sets`). Searching all ``k`` would be a combinatorial problem; the few nearest hold
   nearly all of the useful choices.
2. Softmax-weighted reconstruction: the sub-vector becomes ``sum_j softmax(z)_j * codebook[candidate_j]``, which
   is differentiable w.r.t. the logits ``z`` and the codebook. ``z`` starts at ``log(dist_far / dist_j)``
   (0 for the farthest candidate), so the initial ratios favour the k-means choice.
3. Ratio regulariser ``mean(p * (1 - p))`` over the soft sub-vectors: zero only for one-hot ratios, so the soft
   weight is pushed towards a weight the hard codes can represent.
4. Progressive freezing: a sub-vector whose top ratio passes ``freeze_threshold`` takes that codeword for good
   and leaves the soft set; once ``layer_freeze_fraction`` of a layer is frozen, the rest take their argmax.
5. Codebook fine-tuning: a frozen layer runs the VQ kernel on its hard codes (:func:`blockops.vq.vq_linear`,
   whose backward gives the codebook gradient), and the codebook, scales and bias keep training. The last
   ``finetune_fraction`` of every block's steps is spent this way on every layer, so the loss at the end is
   measured on the weights that inference will run, not on a soft approximation of them.

:func:`calibrate_blockwise` trains one block at a time, in order, to match its teacher's output (MSE) on inputs
the caller's ``input_fn`` generates (zero-data: e.g. Gaussian latents and random class labels pushed through a
DiT's embedders and sampler), then writes the hard codes and trained codebooks back into the ``VQLinear`` modules.

    students = blockops.vq.quantize_blocks(dit.blocks, bits=2, vector_dim=4)       # k-means, k = 256
    def input_fn():              # zero-data block inputs; dit_embed: the DiT's patch, timestep and label embedders
        x, c = dit_embed(torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,)), torch.rand(8) * 1000)
        return x, {"c": c}
    history = blockops.vq.calibrate_blockwise(dit.blocks, students, input_fn, steps=1000)
    dit.blocks = students                                                          # VQLinear, fast kernels
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blockops import checkpoint
from blockops.nn.vq_linear import VQLinear
from blockops.ops import vq
from blockops.quant.kmeans import _squared_distances

CHECKPOINT_VERSION = 1

# Distances are clamped here before the logarithm of the initial logits: a sub-vector equal to a codeword gets a
# huge logit (and is frozen at once) instead of an infinite one.
_MIN_DISTANCE = 1e-12
_STUDENT_INPUTS = ("student", "teacher")


def candidate_sets(vectors: torch.Tensor, codebook: torch.Tensor, num_candidates: int,
                   chunk_size: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_candidates`` codewords nearest (Euclidean) to each of ``vectors [N, d]`` among
    ``codebook [k, d]``, nearest first: ``(candidates [N, n] int64, distances [N, n] fp32)``. Computed in fp32
    ``chunk_size`` vectors at a time so that the ``[chunk, k]`` distance matrix bounds memory."""
    if not 1 <= num_candidates <= codebook.shape[0]:
        raise ValueError(f"candidate_sets: num_candidates must be in [1, k = {codebook.shape[0]}], "
                         f"got {num_candidates}")
    v = vectors.detach().float()
    c = codebook.detach().float()
    c_norm = (c * c).sum(1)
    candidates, distances = [], []
    for s in range(0, v.shape[0], chunk_size):
        dist2, idx = _squared_distances(v[s:s + chunk_size], c, c_norm).topk(num_candidates, 1, largest=False)
        candidates.append(idx)
        distances.append(dist2.clamp_min(0).sqrt())
    return torch.cat(candidates), torch.cat(distances)


class SoftVQLinear(nn.Module):
    """A :class:`~blockops.nn.VQLinear` under calibration; it takes the layer's place in the student block.

    Holds fp32 copies of the codebook, scales and bias (so that small learning rates are not lost to fp16
    rounding) and, per sub-vector ``g`` of the ``[out, in/d]`` grid (flattened, row-major): ``candidates[g]``
    (codeword indices, nearest first), ``logits[g]`` (trainable), ``frozen[g]`` and ``codes[g]`` (the codeword a
    frozen sub-vector keeps). :meth:`write_back` hardens every sub-vector and stores the result in the layer.
    """

    def __init__(self, layer: nn.Module, weight: torch.Tensor, num_candidates: int):
        super().__init__()
        if layer.num_codebooks != 1:
            raise ValueError(f"SoftVQLinear: VQ4DiT calibration needs one codebook per layer, got "
                             f"{layer.num_codebooks} additive codebooks (AQLM's beam search is not implemented)")
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"SoftVQLinear: the full-precision weight is {tuple(weight.shape)}, the layer "
                             f"[{layer.out_features}, {layer.in_features}]")
        self.layer = layer
        self.codebook = nn.Parameter(layer.codebooks.detach()[0].float().clone())
        self.scales = None if layer.scales is None else nn.Parameter(layer.scales.detach().float().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        target = weight.detach().float().to(self.codebook.device)
        if self.scales is not None:
            target = target / torch.where(self.scales == 0, 1.0, self.scales.detach())[:, None]
        candidates, distances = candidate_sets(target.reshape(-1, layer.vector_dim), self.codebook, num_candidates)
        log_distances = distances.clamp_min(_MIN_DISTANCE).log()
        self.register_buffer("candidates", candidates)
        self.logits = nn.Parameter(log_distances[:, -1:] - log_distances)
        self.register_buffer("frozen", torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device))
        self.register_buffer("codes", candidates[:, 0].clone())
        self.hard = False

    # ---- state --------------------------------------------------------------------------------------------

    def ratios(self) -> torch.Tensor:
        """Softmax ratios ``[G, n]`` over each sub-vector's candidates."""
        return self.logits.softmax(-1)

    def frozen_fraction(self) -> float:
        return 1.0 if self.hard else self.frozen.float().mean().item()

    def ratio_penalty(self) -> tuple[torch.Tensor, int]:
        """``(sum of p * (1 - p) over the soft sub-vectors' ratios, number of ratios summed)``, so that a block
        can take the mean over all its layers."""
        if self.hard:
            return self.logits.new_zeros(()), 0
        p = self.logits[~self.frozen].softmax(-1)
        return (p * (1 - p)).sum(), p.numel()

    def weight(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]`` the block sees now: frozen sub-vectors their codeword, the others the
        ratio-weighted average of their candidates, times the row scales."""
        w = self.codebook[self.codes]                                                       # [G, d]
        if not self.hard:
            soft = torch.einsum("gn,gnd->gd", self.ratios(), self.codebook[self.candidates])
            w = torch.where(self.frozen[:, None], w, soft)
        w = w.reshape(self.layer.out_features, self.layer.in_features)
        return w if self.scales is None else w * self.scales[:, None]

    # ---- freezing -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def freeze(self, threshold: float, layer_fraction: float) -> None:
        """Freezes the soft sub-vectors whose top ratio passes ``threshold`` to that candidate; hardens the whole
        layer once at least ``layer_fraction`` of it is frozen. Frozen sub-vectors never thaw."""
        if self.hard:
            return
        top, best = self.ratios().max(-1)
        newly = (top > threshold) & ~self.frozen
        self.codes[newly] = self.candidates[newly, best[newly]]
        self.frozen |= newly
        if self.frozen.float().mean().item() >= layer_fraction:
            self.harden()

    @torch.no_grad()
    def harden(self) -> None:
        """Every remaining soft sub-vector takes its most likely candidate; from now on the layer runs the VQ
        kernel on hard codes and only the codebook, scales and bias train."""
        if self.hard:
            return
        soft = ~self.frozen
        best = self.logits.argmax(-1)
        self.codes[soft] = self.candidates[soft, best[soft]]
        self.frozen.fill_(True)
        self.hard = True
        layer = self.layer
        self.register_buffer("kernel_codes", self.codes.reshape(
            layer.out_features, layer.in_features // layer.vector_dim, 1).to(torch.int32).to(layer.codes.dtype))

    # ---- use ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return vq.vq_linear(x.contiguous(), self.kernel_codes, self.codebook[None], self.scales, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def write_back(self) -> nn.Module:
        """Hardens what is still soft and stores codes, codebook, scales and bias in the wrapped layer (in its
        dtypes); returns the layer, whose ``dequantize()`` then equals :meth:`weight` (up to that dtype) and whose
        forward runs the VQ kernels."""
        self.harden()
        layer = self.layer
        layer.codes.copy_(self.kernel_codes)
        layer.codebooks[0].copy_(self.codebook)
        if self.scales is not None:
            layer.scales.copy_(self.scales)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate_blockwise` measured, per block (outer lists, in block order) and per step (inner
    lists): ``mse``, the block-output MSE against the teacher on that step's inputs before the step's update (so
    ``mse[i][0]`` is the k-means starting point), and ``frozen``, the fraction of the block's sub-vectors frozen
    after the step."""

    mse: list[list[float]]
    frozen: list[list[float]]


def _split_inputs(inputs) -> tuple[torch.Tensor, dict]:
    if isinstance(inputs, torch.Tensor):
        return inputs, {}
    if (isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[0], torch.Tensor)
            and isinstance(inputs[1], dict)):
        return inputs[0], dict(inputs[1])
    raise TypeError("calibrate_blockwise: input_fn() must return the first block's input x (a tensor) or a pair "
                    f"(x, kwargs) with a dict of extra block arguments; got {type(inputs).__name__}")


def _hidden(output, block_index: int) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself or the first element of a tuple (HF-style blocks)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"calibrate_blockwise: block {block_index} returned {type(output).__name__}; expected a "
                        f"tensor or a tuple whose first element is the hidden state")
    return output


def _run_blocks(blocks, x, kwargs, start: int = 0) -> torch.Tensor:
    for i, block in enumerate(blocks):
        x = _hidden(block(x, **kwargs), start + i)
    return x


@torch.no_grad()
def blockwise_mse(teacher_blocks: Sequence[nn.Module], student_blocks: Sequence[nn.Module],
                  inputs: Sequence) -> list[float]:
    """MSE between the teacher's and the student's outputs after each block, with each stack fed its own
    outputs (as at inference), averaged over ``inputs`` (each one what ``input_fn`` returns)."""
    if len(teacher_blocks) != len(student_blocks):
        raise ValueError(f"blockwise_mse: {len(teacher_blocks)} teacher blocks but {len(student_blocks)} "
                         f"student blocks")
    totals = [0.0] * len(teacher_blocks)
    for item in inputs:
        x, kwargs = _split_inputs(item)
        t = s = x
        for i, (teacher, student) in enumerate(zip(teacher_blocks, student_blocks)):
            t = _hidden(teacher(t, **kwargs), i)
            s = _hidden(student(s, **kwargs), i)
            totals[i] += F.mse_loss(s.float(), t.float()).item()
    return [total / max(len(inputs), 1) for total in totals]


class _BlockInputs:
    """Inputs of block i for the teacher and the student. Fresh mode (``num_batches=None``): a new
    ``input_fn()`` batch per step, pushed through blocks 0..i-1 without gradients. Cached mode: ``num_batches``
    batches drawn once, their activations at the current block boundary kept and advanced block by block, so a
    step runs one block whatever i is (GPTQ-style), at the cost of memory and of seeing fewer distinct inputs."""

    def __init__(self, input_fn, teacher_blocks, student_blocks, student_inputs: str, num_batches: int | None):
        self.input_fn, self.teacher_blocks, self.student_blocks = input_fn, teacher_blocks, student_blocks
        self.own_outputs = student_inputs == "student"
        self.cache = None
        if num_batches is not None:
            batches = [_split_inputs(input_fn()) for _ in range(num_batches)]
            self.cache = [(x, x, kwargs) for x, kwargs in batches]   # (teacher input, student input, kwargs)

    @torch.no_grad()
    def get(self, block: int, step: int):
        if self.cache is not None:
            return self.cache[step % len(self.cache)]
        x, kwargs = _split_inputs(self.input_fn())
        teacher_x = _run_blocks(self.teacher_blocks[:block], x, kwargs)
        student_x = _run_blocks(self.student_blocks[:block], x, kwargs) if self.own_outputs else teacher_x
        return teacher_x, student_x, kwargs

    @torch.no_grad()
    def advance(self, block: int) -> None:
        """Block ``block`` is calibrated: move the cached activations past it."""
        if self.cache is None:
            return
        advanced = []
        for teacher_x, student_x, kwargs in self.cache:
            teacher_y = _hidden(self.teacher_blocks[block](teacher_x, **kwargs), block)
            student_y = teacher_y
            if self.own_outputs:
                student_y = _hidden(self.student_blocks[block](student_x, **kwargs), block)
            advanced.append((teacher_y, student_y, kwargs))
        self.cache = advanced


def _attach(teacher: nn.Module, student: nn.Module, block: int, num_candidates: int) -> list[tuple[str, SoftVQLinear]]:
    """Replaces every VQLinear of ``student`` by a SoftVQLinear whose candidates come from the teacher's weight at
    the same module name. Checks every layer before replacing any, so that an error leaves the block as it was."""
    layers = [(name, m) for name, m in student.named_modules() if isinstance(m, VQLinear)]
    if not layers:
        raise ValueError(f"calibrate_blockwise: student block {block} has no VQLinear to calibrate (quantize it "
                         f"first, e.g. with blockops.vq.quantize_blocks or VQLinear.from_linear)")
    wrappers = []
    for name, layer in layers:
        try:
            linear = teacher.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"calibrate_blockwise: student block {block} has VQLinear {name!r} "
                             f"[{layer.out_features}, {layer.in_features}] but teacher block {block} has no nn.Linear "
                             f"of that shape at that name (its weight gives the candidate sets)")
        if num_candidates > layer.codebook_size:
            raise ValueError(f"calibrate_blockwise: num_candidates must be in [1, {layer.codebook_size}] (the codebook "
                             f"size of {name!r}), got {num_candidates}")
        wrappers.append((name, SoftVQLinear(layer, linear.weight, num_candidates)))
    for name, wrapper in wrappers:
        student.set_submodule(name, wrapper)
    return wrappers


def _check_arguments(teacher_blocks, student_blocks, steps, num_candidates, ratio_weight, freeze_threshold,
                     layer_freeze_fraction, finetune_fraction, lr_logits, lr_codebook, student_inputs, num_batches):
    if len(teacher_blocks) != len(student_blocks):
        raise ValueError(f"calibrate_blockwise: {len(teacher_blocks)} teacher blocks but {len(student_blocks)} "
                         f"student blocks; they must pair up one to one")
    if len(teacher_blocks) == 0:
        raise ValueError("calibrate_blockwise: no blocks given")
    checks = [
        (isinstance(steps, int) and steps >= 1, f"steps must be an int >= 1, got {steps!r}"),
        (isinstance(num_candidates, int) and num_candidates >= 1,
         f"num_candidates must be an int >= 1, got {num_candidates!r}"),
        (ratio_weight >= 0, f"ratio_weight must be >= 0, got {ratio_weight}"),
        (0 < freeze_threshold < 1, f"freeze_threshold must be in (0, 1), got {freeze_threshold}"),
        (0 < layer_freeze_fraction <= 1, f"layer_freeze_fraction must be in (0, 1], got {layer_freeze_fraction}"),
        (0 <= finetune_fraction < 1, f"finetune_fraction must be in [0, 1), got {finetune_fraction}"),
        (lr_logits > 0 and lr_codebook >= 0,
         f"learning rates must be lr_logits > 0 and lr_codebook >= 0, got {lr_logits} and {lr_codebook}"),
        (student_inputs in _STUDENT_INPUTS,
         f"student_inputs must be one of {_STUDENT_INPUTS}, got {student_inputs!r}"),
        (num_batches is None or (isinstance(num_batches, int) and num_batches >= 1),
         f"num_batches must be None or an int >= 1, got {num_batches!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"calibrate_blockwise: {message}")


@contextlib.contextmanager
def _eval_mode(modules):
    """Dropout and the like off while calibrating (teacher and student must be deterministic functions),
    restored afterwards."""
    modes = [(m, m.training) for block in modules for m in block.modules()]
    for block in modules:
        block.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def calibrate_blockwise(teacher_blocks: Sequence[nn.Module], student_blocks: Sequence[nn.Module],
                        input_fn: Callable[[], object], steps: int, *, num_candidates: int = 2,
                        ratio_weight: float = 10.0, freeze_threshold: float = 0.99,
                        layer_freeze_fraction: float = 0.99, finetune_fraction: float = 0.2,
                        lr_logits: float = 5e-2, lr_codebook: float = 1e-3, student_inputs: str = "student",
                        num_batches: int | None = None, seed: int = 0, checkpoint_dir: str | None = None,
                        progress: bool = True) -> CalibrationResult:
    """VQ4DiT zero-data block-wise calibration (see the module docstring); modifies ``student_blocks`` in place.

    Args:
        teacher_blocks: the full-precision blocks, in order (e.g. a DiT's ``model.blocks``); not modified.
        student_blocks: the same blocks with ``VQLinear`` layers (e.g. from :func:`quantize_blocks`); each
            ``VQLinear`` must have an ``nn.Linear`` of the same shape at the same module name in its teacher
            block, whose weight gives the candidate sets. One codebook per layer (VQ4DiT's format).
        input_fn: called with no arguments, returns the first block's input ``x`` or ``(x, kwargs)``; the
            kwargs (e.g. a DiT's conditioning ``{"c": c}``) go to every block. Block ``i`` must accept
            ``block(x, **kwargs)`` and return the next hidden state (or a tuple starting with it). For a DiT:
            random class labels and Gaussian latents, a random timestep or a few sampler steps, then the
            embedders; no dataset is needed.
        steps: optimizer steps per block.
        num_candidates: codewords per candidate set; 2 as in the authors' code (their ablation reportedly
            prefers 3).
        ratio_weight: weight of the ratio regulariser against the block's MSE. The MSE is divided by its value
            on the block's first step (the k-means error), so the weight means the same for every block
            whatever its output scale (DiT residual streams grow with depth). 10 froze most sub-vectors before
            the fine-tuning phase and gave the lowest MSE of {1, 10, 30} on the toy stack of
            ``blockops.bench.vq_calibration``.
        freeze_threshold, layer_freeze_fraction: progressive freezing (0.99 and 0.99 as in VQ4DiT).
        finetune_fraction: the last ``round(finetune_fraction * steps)`` steps of each block run with every
            layer hardened: codebook fine-tuning on the weights inference will run.
        lr_logits, lr_codebook: RMSprop (alpha 0.9) learning rates of the logits and of the codebooks, row
            scales and biases. VQ4DiT uses 5e-2 and 1e-4, the latter on raw DiT weights (RMS about 0.02);
            ``from_linear(scales=True)`` codebooks are in units of the row RMS, where 1e-3 did better on the toy
            stack (1e-4 ended 12-14% higher).
        student_inputs: ``"student"`` (default): the student block sees the calibrated student's own previous
            outputs, as at inference, so each block also learns to correct the error of those before it (VQ4DiT
            hooks the student's own forward); ``"teacher"``: the teacher's, so each block only learns its own
            error.
        num_batches: None (default) draws a fresh ``input_fn()`` every step and pushes it through the
            blocks before the current one (cost grows with the block index); an int draws that many batches
            once and keeps their activations at the current block (each step runs one block).
        seed: seeds torch's global generator (forked, restored afterwards) before the first ``input_fn()``, and
            with ``seed + 1 + i`` before block i, so a run is reproducible when ``input_fn`` draws from it, and a
            resumed run draws what an uninterrupted one would.
        checkpoint_dir: after each block, the student block's state (codes, codebooks, scales, biases) and its
            history are written there atomically (`blockops.checkpoint`); a later call with the same arguments,
            teacher and k-means students (and, with ``num_batches``, the same drawn inputs) loads the finished
            blocks instead of calibrating them again, so a killed run loses at most the block in progress. A
            checkpoint made with anything else different is refused.
        progress: show a tqdm progress bar.

    Returns a :class:`CalibrationResult` (per-block, per-step MSE and frozen fraction). At the end every
    ``VQLinear`` holds hard codes and the trained codebook, scales and bias, and runs the VQ kernels as before.
    """
    from tqdm.auto import tqdm

    teacher_blocks, student_blocks = list(teacher_blocks), list(student_blocks)
    _check_arguments(teacher_blocks, student_blocks, steps, num_candidates, ratio_weight, freeze_threshold,
                     layer_freeze_fraction, finetune_fraction, lr_logits, lr_codebook, student_inputs, num_batches)
    finetune_from = steps - round(finetune_fraction * steps)
    devices = sorted({p.device.index or 0 for b in student_blocks for p in b.parameters() if p.device.type == "cuda"})
    result = CalibrationResult([], [])
    with torch.random.fork_rng(devices=devices), _eval_mode(teacher_blocks + student_blocks):
        torch.manual_seed(seed)
        inputs = _BlockInputs(input_fn, teacher_blocks, student_blocks, student_inputs, num_batches)
        meta = None
        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
            meta = dict(version=CHECKPOINT_VERSION, steps=steps, num_candidates=num_candidates,
                        ratio_weight=ratio_weight, freeze_threshold=freeze_threshold,
                        layer_freeze_fraction=layer_freeze_fraction, finetune_fraction=finetune_fraction,
                        lr_logits=lr_logits, lr_codebook=lr_codebook, student_inputs=student_inputs,
                        num_batches=num_batches, seed=seed, num_blocks=len(student_blocks),
                        teacher=checkpoint.fingerprint([b.state_dict() for b in teacher_blocks]),
                        students=checkpoint.fingerprint([b.state_dict() for b in student_blocks]),
                        data=checkpoint.fingerprint(inputs.cache) if inputs.cache is not None else None)
        bar = tqdm(total=steps * len(student_blocks), desc="VQ4DiT calibration", disable=not progress)
        for i, (teacher, student) in enumerate(zip(teacher_blocks, student_blocks)):
            torch.manual_seed(seed + 1 + i)
            path = checkpoint.block_path(checkpoint_dir, i) if checkpoint_dir else None
            if path and os.path.exists(path):
                saved = checkpoint.load_block(path, meta, "calibrate_blockwise")
                student.load_state_dict(saved["state"], strict=True)
                mse_history, frozen_history = saved["mse"], saved["frozen"]
                bar.update(steps)
            else:
                layers = _attach(teacher, student, i, num_candidates)
                try:
                    mse_history, frozen_history = _calibrate_block(
                        teacher, student, i, [m for _, m in layers], inputs, steps, finetune_from, ratio_weight,
                        freeze_threshold, layer_freeze_fraction, lr_logits, lr_codebook, bar)
                finally:
                    for name, wrapper in layers:   # also on error: the student gets its VQLinear modules back
                        student.set_submodule(name, wrapper.write_back())
                if path:
                    checkpoint.atomic_save({"meta": meta, "state": student.state_dict(), "mse": mse_history,
                                            "frozen": frozen_history}, path)
            result.mse.append(mse_history)
            result.frozen.append(frozen_history)
            inputs.advance(i)
        bar.close()
    return result


def _calibrate_block(teacher, student, index, layers, inputs, steps, finetune_from, ratio_weight,
                     freeze_threshold, layer_freeze_fraction, lr_logits, lr_codebook, bar):
    logits = [m.logits for m in layers]
    others = [p for m in layers for p in (m.codebook, m.scales, m.bias) if p is not None]
    params = logits + others
    optimizer = torch.optim.RMSprop([{"params": logits, "lr": lr_logits}, {"params": others, "lr": lr_codebook}],
                                    alpha=0.9)
    sub_vectors = sum(m.frozen.numel() for m in layers)
    mse_history, frozen_history = [], []
    mse_scale = None
    for step in range(steps):
        if step == finetune_from:
            for m in layers:
                m.harden()
        teacher_x, student_x, kwargs = inputs.get(index, step)
        with torch.no_grad():
            target = _hidden(teacher(teacher_x, **kwargs), index).float()
        output = _hidden(student(student_x, **kwargs), index).float()
        if output.shape != target.shape:
            raise ValueError(f"calibrate_blockwise: student block {index} returned {tuple(output.shape)}, its teacher "
                             f"{tuple(target.shape)}")
        mse = F.mse_loss(output, target)
        if mse_scale is None:
            mse_scale = mse.detach().clamp_min(torch.finfo(torch.float32).tiny)
        penalties = [m.ratio_penalty() for m in layers]
        count = sum(n for _, n in penalties)
        loss = mse / mse_scale
        if count:
            loss = loss + ratio_weight * sum(p for p, _ in penalties) / count
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for m in layers:
            m.freeze(freeze_threshold, layer_freeze_fraction)
        frozen = sum(m.frozen_fraction() * m.frozen.numel() for m in layers) / sub_vectors
        mse_history.append(mse.item())
        frozen_history.append(frozen)
        bar.update(1)
        bar.set_postfix(block=index, mse=f"{mse.item():.3g}", frozen=f"{frozen:.0%}", refresh=False)
    return mse_history, frozen_history


def quantize_blocks(blocks: Sequence[nn.Module], *, bits: float | None = None, codebook_size: int | None = None,
                    vector_dim: int = 4, iters: int = 25, seed: int = 0, scales: bool = True,
                    dtype: torch.dtype | None = None,
                    filter_fn: Callable[[nn.Linear, str], bool] | None = None, progress: bool = False) -> nn.ModuleList:
    """Student blocks for :func:`calibrate_blockwise`: deep copies of ``blocks`` with every ``nn.Linear`` (for
    which ``filter_fn(linear, name)`` holds) replaced by ``VQLinear.from_linear(...)`` (k-means; arguments as
    there; 2 bits when neither ``bits`` nor ``codebook_size`` is given). Linear layers whose in_features is not a
    multiple of ``vector_dim`` stay dense. The k-means seed differs per layer (``seed`` + a running index).
    ``progress``: a progress bar over the layers (k-means of a whole model takes minutes on a CPU)."""
    from tqdm import tqdm

    if bits is None and codebook_size is None:
        bits = 2
    students = nn.ModuleList(copy.deepcopy(b) for b in blocks)
    selected = [(student, [(name, m) for name, m in student.named_modules()
                           if type(m) is nn.Linear and m.in_features % vector_dim == 0
                           and (filter_fn is None or filter_fn(m, name))]) for student in students]
    layer_seed = seed
    with tqdm(total=sum(len(layers) for _, layers in selected), desc="VQ k-means (layers)", disable=not progress,
              leave=False) as bar:
        for student, layers in selected:
            for name, linear in layers:
                student.set_submodule(name, VQLinear.from_linear(
                    linear, bits=bits, codebook_size=codebook_size, vector_dim=vector_dim, iters=iters,
                    seed=layer_seed, scales=scales, dtype=dtype))
                layer_seed += 1
                bar.update()
    return students


__all__ = ["CalibrationResult", "SoftVQLinear", "blockwise_mse", "calibrate_blockwise", "candidate_sets",
           "quantize_blocks"]
