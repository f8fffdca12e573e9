"""VQ4DiT calibration (blockops.quant.vq4dit.calibrate_blockwise and its parts): lower block-output MSE than k-means
alone on a small DiT-style stack, candidate sets, progressive freezing, hard codes written back, seeds, input modes
and error paths. Tiny shapes and few steps, so each test takes seconds on a loaded 2-core CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from blockops.quant import vq4dit
from blockops.bench.vq_calibration import ToyDiTBlock, toy_dit, toy_inputs
from blockops.nn import VQLinear
from helpers import assert_compiles, kernel_ran

DIM, HIDDEN, COND = 32, 64, 16
# Tiny layers need a small codebook for the quantization error to matter: k = 16 at d = 4 is 1 bit per weight.
QUANT = dict(codebook_size=16, vector_dim=4, iters=10)
FAST = dict(progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: a second thread only adds synchronisation, which on a loaded machine costs 10-20x
    (measured: 124 s instead of 5 s for the first test at a load average of 390)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_stack(num_blocks=2, seed=0, **quant):
    teacher = toy_dit(num_blocks, DIM, 2, HIDDEN, COND, seed=seed)
    student = vq4dit.quantize_blocks(teacher, seed=seed, **{**QUANT, **quant})
    return teacher, student


def inputs_fn():
    """Zero-data inputs: 8 sequences of 8 Gaussian tokens and Gaussian conditioning vectors per call."""
    return toy_inputs(8, 8, DIM, COND)


def held_out(count=8, seed=1234):
    input_fn = inputs_fn()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [input_fn() for _ in range(count)]


def vq_layers(blocks):
    return [m for b in blocks for m in b.modules() if isinstance(m, VQLinear)]


def state(blocks):
    return [(m.codes.clone(), m.codebooks.detach().clone()) for m in vq_layers(blocks)]


def test_calibration_beats_kmeans():
    teacher, student = make_stack()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    inputs = held_out()
    kmeans_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    result = vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), 100, **FAST)
    calibrated_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    assert all(c < k for c, k in zip(calibrated_mse, kmeans_mse)), (kmeans_mse, calibrated_mse)
    assert calibrated_mse[-1] < 0.75 * kmeans_mse[-1], (kmeans_mse, calibrated_mse)
    # Freezing is progressive and monotone, and every block ends frozen.
    for history in result.frozen:
        assert history == sorted(history) and history[-1] == 1.0
        assert 0 < history[50] < 1, f"no progressive freezing: {history}"
    # The student holds VQLinear modules again, and they run the compiled kernel.
    assert len(result.mse) == 2 and all(len(h) == 100 for h in result.mse)
    assert len(vq_layers(student)) == 10 and not any(isinstance(m, vq4dit.SoftVQLinear) for m in student.modules())
    with kernel_ran("vq_linear", "cpu"):
        vq4dit.blockwise_mse(teacher, student, inputs[:1])
    # The teacher is not modified.
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())


def test_candidate_sets_are_the_nearest_codewords():
    g = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(1000, 4, generator=g), torch.randn(64, 4, generator=g)
    candidates, distances = vq4dit.candidate_sets(vectors, codebook, 3, chunk_size=97)
    exact = torch.cdist(vectors.double(), codebook.double())
    ranked = exact.sort(1)
    assert torch.equal(candidates[:, 0], ranked.indices[:, 0])
    torch.testing.assert_close(distances.double(), ranked.values[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distances.double(), exact.gather(1, candidates), atol=1e-5, rtol=1e-5)


def test_soft_layer_starts_from_kmeans():
    """Candidates of a from_linear layer: the nearest is the k-means code; the initial logits log(far / dist)
    are 0 for the farthest and rank the candidates nearest first."""
    linear = nn.Linear(24, 20)
    layer = VQLinear.from_linear(linear, codebook_size=16, vector_dim=4, dtype=torch.float32)
    soft = vq4dit.SoftVQLinear(layer, linear.weight, num_candidates=3)
    assert torch.equal(soft.candidates[:, 0], layer.codes.reshape(-1).long())
    assert torch.equal(soft.logits[:, -1], torch.zeros(120))
    assert (soft.logits[:, :-1].diff(dim=1) <= 0).all() and (soft.logits >= 0).all()
    assert soft.frozen_fraction() == 0.0


def test_freezing_is_monotone_and_keeps_codes():
    linear = nn.Linear(32, 24)
    layer = VQLinear.from_linear(linear, codebook_size=16, vector_dim=4, dtype=torch.float32)
    soft = vq4dit.SoftVQLinear(layer, linear.weight, num_candidates=2)
    g = torch.Generator().manual_seed(0)
    frozen, codes = soft.frozen.clone(), soft.codes.clone()
    fractions = []
    drift = torch.randn(soft.logits.shape, generator=g)
    for _ in range(200):
        with torch.no_grad():     # random walks with drift stand in for training
            soft.logits += 0.1 * drift + 0.3 * torch.randn(soft.logits.shape, generator=g)
        top, best = soft.ratios().max(-1)
        soft.freeze(0.99, 0.9)
        assert (soft.frozen | ~frozen).all(), "a frozen sub-vector thawed"
        assert torch.equal(soft.codes[frozen], codes[frozen]), "a frozen sub-vector changed codeword"
        newly = soft.frozen & ~frozen
        if not soft.hard:
            assert (top[newly] > 0.99).all() and not (top[~soft.frozen] > 0.99).any()
            assert torch.equal(soft.codes[newly], soft.candidates[newly, best[newly]]), "not frozen to the argmax"
            # Frozen sub-vectors leave the soft set: their logits no longer matter.
            with torch.no_grad():
                soft.logits[soft.frozen] = 0.0
            w = soft.weight().detach().reshape(-1, 4)
            hard = (soft.codebook[soft.codes] * soft.scales.repeat_interleave(8)[:, None]).detach()
            assert torch.equal(w[soft.frozen], hard[soft.frozen])
        frozen, codes = soft.frozen.clone(), soft.codes.clone()
        fractions.append(soft.frozen_fraction())
        if soft.hard:
            break
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and soft.hard
    assert fractions[0] < 0.9, "the walk should freeze progressively, not all at once"
    # The ratio regulariser covers only soft sub-vectors: nothing left once the layer is hard.
    assert soft.ratio_penalty()[1] == 0


def one_hot_soft_layer(seed=0):
    """A SoftVQLinear whose ratios are exactly one-hot (exp(-1000) is 0 in fp32)."""
    torch.manual_seed(seed)
    linear = nn.Linear(40, 12)
    layer = VQLinear.from_linear(linear, codebook_size=16, vector_dim=4, dtype=torch.float32)
    soft = vq4dit.SoftVQLinear(layer, linear.weight, num_candidates=3)
    choice = torch.randint(3, (soft.logits.shape[0],), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        soft.logits.copy_(1000 * nn.functional.one_hot(choice, 3))
    return soft


def test_hard_and_soft_paths_agree():
    """With one-hot ratios the soft path (PyTorch autograd through the gathered codewords) and the hard path
    (the VQ kernel and its codebook/scales backward) compute the same output and the same gradients."""
    soft = one_hot_soft_layer()
    x = torch.randn(6, 40)
    grad_out = torch.randn(6, 12)
    params = [soft.codebook, soft.scales, soft.bias]
    y_soft = soft(x)
    grads_soft = torch.autograd.grad(y_soft, params, grad_out)
    soft.harden()
    with kernel_ran("vq_grad_codebooks", "cpu"):
        y_hard = soft(x)
        grads_hard = torch.autograd.grad(y_hard, params, grad_out)
    torch.testing.assert_close(y_hard, y_soft, rtol=1e-5, atol=1e-5)
    for g_hard, g_soft in zip(grads_hard, grads_soft):
        torch.testing.assert_close(g_hard, g_soft, rtol=1e-4, atol=1e-5)


def test_write_back_reproduces_the_converged_soft_weight():
    """Once every ratio is one-hot the soft weight is a codeword per sub-vector: the hard codes written back
    give exactly that weight through the kernels."""
    soft = one_hot_soft_layer()
    layer = soft.layer
    with torch.no_grad():
        soft.codebook.add_(0.01 * torch.randn_like(soft.codebook))    # as if fine-tuned
    converged = soft.weight().detach()
    x = torch.randn(5, 40)
    soft_out = soft(x).detach()
    assert soft.write_back() is layer
    assert torch.equal(layer.dequantize(), converged)
    torch.testing.assert_close(layer(x), soft_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.codebooks[0], soft.codebook.detach())


@pytest.mark.parametrize("hard", [False, True])
def test_compile(hard):
    soft = one_hot_soft_layer()
    if hard:
        soft.harden()
    assert_compiles(soft, torch.randn(5, 40))


def test_fp16_student_and_hard_phase_uses_the_kernel():
    """fp16 VQLinear (from_linear's default dtype): fp32 masters during calibration, cast back at the end. With
    finetune_fraction the last steps run the VQ kernel (codebook fine-tuning through its backward)."""
    teacher, student = make_stack(num_blocks=1, dtype=torch.float16)
    before = state(student)
    with kernel_ran("vq_grad_codebooks", "cpu"):
        vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), 10, finetune_fraction=0.5, **FAST)
    after = state(student)
    assert all(cb.dtype == torch.float16 for _, cb in after)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(before, after)), "codebooks did not train"


def test_seed_reproducibility():
    runs = []
    for seed in (0, 0, 1):
        teacher, student = make_stack()
        result = vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), 15, seed=seed, **FAST)
        runs.append((result, state(student)))
    (r0, s0), (r1, s1), (r2, _) = runs
    assert r0.mse == r1.mse and r0.frozen == r1.frozen
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(s0, s1))
    assert r0.mse != r2.mse
    # The caller's global generator is left as it was.
    teacher, student = make_stack(num_blocks=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), 2, **FAST)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_batches", [None, 3])
def test_resumes_from_per_block_checkpoints(tmp_path, monkeypatch, num_batches):
    """A run killed while calibrating block 2 of 3, rerun with the same checkpoint folder, loads blocks 0-1 and
    ends identical to an uninterrupted run (fresh and cached input modes); other settings are refused."""
    settings = dict(steps=12, num_batches=num_batches, seed=3, **FAST)
    teacher, uninterrupted = make_stack(num_blocks=3)
    expected = vq4dit.calibrate_blockwise(teacher, uninterrupted, inputs_fn(), checkpoint_dir=str(tmp_path / "a"),
                                          **settings)

    calibrate_block = vq4dit._calibrate_block

    def killed_at_block_2(teacher, student, index, *args):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return calibrate_block(teacher, student, index, *args)

    monkeypatch.setattr(vq4dit, "_calibrate_block", killed_at_block_2)
    teacher, student = make_stack(num_blocks=3)
    with pytest.raises(KeyboardInterrupt):
        vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), checkpoint_dir=str(tmp_path / "b"), **settings)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["block_0000.pt", "block_0001.pt"]
    monkeypatch.setattr(vq4dit, "_calibrate_block", calibrate_block)

    calls = []
    monkeypatch.setattr(vq4dit, "_calibrate_block",
                        lambda teacher, student, index, *args: calls.append(index) or
                        calibrate_block(teacher, student, index, *args))
    teacher, resumed = make_stack(num_blocks=3)   # a fresh process: k-means students again
    result = vq4dit.calibrate_blockwise(teacher, resumed, inputs_fn(), checkpoint_dir=str(tmp_path / "b"), **settings)
    assert calls == [2], "only the unfinished block is calibrated again"
    assert result.mse == expected.mse and result.frozen == expected.frozen
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(state(resumed), state(uninterrupted)))
    teacher, student = make_stack(num_blocks=3)
    with pytest.raises(ValueError, match="other settings or data"):
        vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), checkpoint_dir=str(tmp_path / "b"),
                                   **dict(settings, steps=13))
    teacher, student = make_stack(num_blocks=3, seed=1)   # other k-means students
    with pytest.raises(ValueError, match="other settings or data"):
        vq4dit.calibrate_blockwise(teacher, student, inputs_fn(), checkpoint_dir=str(tmp_path / "b"), **settings)


@pytest.mark.parametrize("student_inputs, num_batches", [("teacher", None), ("student", 3), ("teacher", 2)])
def test_input_modes(student_inputs, num_batches):
    teacher, student = make_stack()
    inputs = held_out()
    kmeans_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    calls = []
    input_fn = inputs_fn()
    result = vq4dit.calibrate_blockwise(teacher, student, lambda: calls.append(1) or input_fn(), 40,
                                        student_inputs=student_inputs, num_batches=num_batches, **FAST)
    assert len(calls) == (num_batches or 2 * 40)
    calibrated_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    assert calibrated_mse[-1] < kmeans_mse[-1], (kmeans_mse, calibrated_mse)
    assert [f[-1] for f in result.frozen] == [1.0, 1.0]


class TupleMLP(nn.Module):
    """A generic (non-DiT) block: no conditioning, returns a tuple as Hugging Face layers do."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return (x + self.mlp(x),)


def test_generic_blocks_without_kwargs():
    torch.manual_seed(0)
    teacher = nn.ModuleList(TupleMLP(32) for _ in range(3))
    student = vq4dit.quantize_blocks(teacher, **QUANT)
    assert len(vq_layers(student)) == 6 and not vq_layers(teacher)

    def input_fn():
        return torch.randn(16, 32) * torch.linspace(0.1, 3, 32)   # uneven channel scales
    with torch.random.fork_rng():
        torch.manual_seed(7)
        inputs = [input_fn() for _ in range(4)]
    kmeans_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    vq4dit.calibrate_blockwise(teacher, student, input_fn, 40, **FAST)
    calibrated_mse = vq4dit.blockwise_mse(teacher, student, inputs)
    assert calibrated_mse[-1] < kmeans_mse[-1], (kmeans_mse, calibrated_mse)


def test_quantize_blocks_filter_and_skips():
    teacher = nn.ModuleList([nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 6), nn.Linear(6, 8))])
    student = vq4dit.quantize_blocks(teacher, bits=2, vector_dim=4, filter_fn=lambda m, name: name != "1")
    kinds = [type(m).__name__ for m in student[0]]
    assert kinds == ["VQLinear", "Linear", "Linear"]     # "1" filtered out; 6 inputs not a multiple of 4
    assert type(teacher[0][0]) is nn.Linear


class NarrowOutput(ToyDiTBlock):
    """A teacher whose output does not match its student's."""

    def forward(self, x, c):
        return super().forward(x, c)[..., :16]


def test_errors():
    teacher, student = make_stack()
    input_fn = inputs_fn()
    with pytest.raises(ValueError, match="2 teacher blocks but 1 student blocks"):
        vq4dit.calibrate_blockwise(teacher, student[:1], input_fn, 1, progress=False)
    with pytest.raises(ValueError, match="2 teacher blocks but 1 student blocks"):
        vq4dit.blockwise_mse(teacher, student[:1], held_out(1))
    with pytest.raises(ValueError, match="no blocks"):
        vq4dit.calibrate_blockwise([], [], input_fn, 1, progress=False)
    with pytest.raises(ValueError, match="student block 0 has no VQLinear"):
        vq4dit.calibrate_blockwise(teacher, teacher, input_fn, 1, progress=False)
    bad = [dict(steps=0), dict(steps=2.5), dict(num_candidates=0), dict(ratio_weight=-1.0),
           dict(freeze_threshold=1.0), dict(layer_freeze_fraction=0.0), dict(finetune_fraction=1.0),
           dict(lr_logits=0.0), dict(lr_codebook=-1e-3), dict(student_inputs="own"), dict(num_batches=0)]
    for kwargs in bad:
        name = next(iter(kwargs))
        args = dict(steps=1, progress=False) | kwargs
        with pytest.raises(ValueError, match=name):
            vq4dit.calibrate_blockwise(teacher, student, input_fn, **args)
    with pytest.raises(ValueError, match=r"num_candidates must be in \[1, 16\]"):
        vq4dit.calibrate_blockwise(teacher, student, input_fn, 1, num_candidates=17, progress=False)
    with pytest.raises(TypeError, match="input_fn\\(\\) must return"):
        vq4dit.calibrate_blockwise(teacher, student, lambda: [1, 2, 3], 1, progress=False)
    with pytest.raises(ValueError, match="'fc2' .* no nn.Linear of that shape at that name"):
        wrong = toy_dit(2, DIM, 2, HIDDEN, COND)
        wrong[0].fc2 = nn.Identity()
        vq4dit.calibrate_blockwise(wrong, student, input_fn, 1, progress=False)
    with pytest.raises(ValueError, match=r"student block 0 returned \(8, 8, 32\), its teacher \(8, 8, 16\)"):
        narrow = [NarrowOutput(DIM, 2, HIDDEN, COND) for _ in range(2)]
        for block, source in zip(narrow, teacher):
            block.load_state_dict(source.state_dict())
        vq4dit.calibrate_blockwise(narrow, student, input_fn, 1, progress=False)
    # Failed runs leave the student with its VQLinear modules, not wrappers; also when input_fn fails mid-block.
    assert len(vq_layers(student)) == 10 and not any(isinstance(m, vq4dit.SoftVQLinear) for m in student.modules())
    calls = []

    def failing_input_fn():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("sampler failed")
        return input_fn()
    with pytest.raises(RuntimeError, match="sampler failed"):
        vq4dit.calibrate_blockwise(teacher, student, failing_input_fn, 10, progress=False)
    assert len(vq_layers(student)) == 10 and not any(isinstance(m, vq4dit.SoftVQLinear) for m in student.modules())
    additive = VQLinear(32, 8, codebook_size=16, vector_dim=4, num_codebooks=2)
    with pytest.raises(ValueError, match="one codebook per layer"):
        vq4dit.SoftVQLinear(additive, torch.randn(8, 32), 2)
    with pytest.raises(ValueError, match=r"full-precision weight is \(8, 16\)"):
        vq4dit.SoftVQLinear(VQLinear(32, 8, codebook_size=16, vector_dim=4), torch.randn(8, 16), 2)
    with pytest.raises(ValueError, match=r"num_candidates must be in \[1, k = 16\]"):
        vq4dit.candidate_sets(torch.randn(10, 4), torch.randn(16, 4), 20)
