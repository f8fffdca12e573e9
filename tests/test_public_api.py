"""The names users call keep working after the op-layer / algorithm-layer split (issue 15): every name the README
mentions, every public name of the user-facing namespaces as they were before the split, and the former homes of
moved names resolve to the very objects of their new homes."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re

import pytest

import blockops


def resolve(dotted: str):
    """``a.b.c.name`` -> the object: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


# Public names of the user-facing namespaces before the split (their __all__, or for modules without one the names
# they defined), each with its new home: the module whose object the old name must be (None: the same module).
OLD_NAMES = {
    "blockops": {
        "QuantConfig": "blockops.quant.rtn", "quantize_": "blockops.quant.rtn",
        "load_gptq_checkpoint": "blockops.quant.gptq",
        "pack_bits": "blockops.ops.bitpack", "unpack_bits": "blockops.ops.bitpack",
        "attention": None, "build_info": None, "cache": None, "dllm": None, "kernel_call_counts": None, "nn": None,
        "ops": None, "ptq161": None, "quant": None, "vq": None,
    },
    "blockops.ops": {
        "pack_bits": "blockops.ops.bitpack", "unpack_bits": "blockops.ops.bitpack",
        "packed_length": "blockops.ops.bitpack", "values_per_word": "blockops.ops.bitpack",
        "quant_linear": "blockops.ops.lowbit", "quant_dequantize": "blockops.ops.lowbit",
        "MASK_FIELDS": "blockops.ops.attention", "block_sparse_attention_op": "blockops.ops.attention",
    },
    "blockops.nn": {
        "BlockSparseAttention": "blockops.nn.block_sparse_attention",
        "BlockSparseMultiheadAttention": "blockops.nn.block_sparse_attention",
        "swap_attention": "blockops.nn.block_sparse_attention",
        "PaTHAttention": "blockops.nn.path_attention", "PaTHAttentionCache": "blockops.nn.path_attention",
        "PTQ161Linear": "blockops.nn.ptq161_linear", "QuantLinear": "blockops.nn.quant_linear",
        "VQLinear": "blockops.nn.vq_linear",
    },
    "blockops.nn.quant_linear": {"CHECKPOINT_FORMATS": None, "QuantLinear": None, "quantize_rtn": "blockops.quant.rtn"},
    "blockops.nn.vq_linear": {"VQLinear": None},
    "blockops.nn.ptq161_linear": {"PTQ161Linear": None},
    "blockops.nn.path_attention": {"PaTHAttention": None, "PaTHAttentionCache": None},
    "blockops.nn.block_sparse_attention": {"BlockSparseAttention": None, "BlockSparseMultiheadAttention": None,
                                           "MaskBuilder": None, "swap_attention": None},
    "blockops.attention": {
        "PathCache": "blockops.ops.path_attention", "path_attention": "blockops.ops.path_attention",
        "path_decode_step": "blockops.ops.path_attention",
        "block_sparse_attention": "blockops.attention.sparse_attention",
        "scaled_dot_product_attention": "blockops.attention.sparse_attention",
        "BLOCK_SIZES": "blockops.attention.block_mask", "BlockMask": "blockops.attention.block_mask",
        "Density": "blockops.attention.block_mask",
        "and_masks": "blockops.attention.masks", "or_masks": "blockops.attention.masks",
        "per_head": "blockops.attention.masks",
        "hilbert_order": "blockops.attention.hilbert", "inverse_permutation": "blockops.attention.hilbert",
        "reorder": "blockops.attention.hilbert", "restore": "blockops.attention.hilbert",
        "hilbert": None, "masks": None,
    },
    "blockops.vq": {
        "vq_linear": "blockops.ops.vq", "vq_dequantize": "blockops.ops.vq", "bits_per_weight": "blockops.ops.vq",
        "kmeans": "blockops.quant.kmeans",
        "CalibrationResult": "blockops.quant.vq4dit", "SoftVQLinear": "blockops.quant.vq4dit",
        "blockwise_mse": "blockops.quant.vq4dit", "calibrate_blockwise": "blockops.quant.vq4dit",
        "candidate_sets": "blockops.quant.vq4dit", "quantize_blocks": "blockops.quant.vq4dit",
    },
    "blockops.ptq161": {
        "FIELDS": "blockops.ops.ptq161", "bits_per_weight": "blockops.ops.ptq161",
        "ptq161_dequantize": "blockops.ops.ptq161", "ptq161_linear": "blockops.ops.ptq161",
        "salient_padded": "blockops.ops.ptq161", "SALIENT_ALIGN": "blockops.ops.ptq161",
        "quantize_weight": "blockops.quant.ptq161", "salient_count": "blockops.quant.ptq161",
    },
    "blockops.dllm": {
        "Unmasked": "blockops.ops.dllm", "kv_overwrite": "blockops.ops.dllm", "kv_overwrite_range": "blockops.ops.dllm",
        "unmask": "blockops.ops.dllm",
        "DiffusionKVCache": "blockops.dllm.generate", "GenerateOutput": "blockops.dllm.generate",
        "GenerationStats": "blockops.dllm.generate", "generate": "blockops.dllm.generate",
        "generate_block_diffusion": "blockops.dllm.generate",
    },
    "blockops.cache": {
        "apply_residual": "blockops.ops.block_cache", "cache_update": "blockops.ops.block_cache",
        "relative_l1": "blockops.ops.block_cache", "relative_l1_residual": "blockops.ops.block_cache",
        "BlockCache": "blockops.block_cache.api", "cache_context": "blockops.block_cache.api",
        "disable_block_cache": "blockops.block_cache.api", "enable_block_cache": "blockops.block_cache.api",
        "get_block_cache": "blockops.block_cache.api",
        "BACSchedule": "blockops.block_cache.bac", "bubbling_union": "blockops.block_cache.bac",
        "caching_error": "blockops.block_cache.bac", "optimal_update_steps": "blockops.block_cache.bac",
        "schedule_value": "blockops.block_cache.bac",
        "Always": "blockops.block_cache.policies", "BWCache": "blockops.block_cache.policies",
        "FirstBlockCache": "blockops.block_cache.policies", "Never": "blockops.block_cache.policies",
        "Policy": "blockops.block_cache.policies", "RecordFeatures": "blockops.block_cache.policies",
        "TeaCache": "blockops.block_cache.policies", "TeaCacheCalibration": "blockops.block_cache.policies",
        "fit_teacache_coefficients": "blockops.block_cache.policies",
    },
    "blockops.quant": {"ptq161": None},
    "blockops.quant.ptq161": {"block_loss": None, "collect_act_scales": None, "optimize_block": None,
                              "quantization_preprocessing": None, "quantize_linears": None,
                              "PTQ161Linear": "blockops.nn.ptq161_linear"},
    "blockops.quant.efficientqat": {
        name: None for name in ("BlockReport", "CHECKPOINT_VERSION", "FINAL_LR_FRACTION", "FakeQuantLinear",
                                "SCALE_MAX", "SCALE_MIN", "block_ap", "capture_block_inputs", "default_forward",
                                "e2e_qp", "fake_quant_codes", "find_blocks", "round_ste")
    } | {"QuantLinear": "blockops.nn.quant_linear", "quantize_rtn": "blockops.quant.rtn"},
    "blockops.quant.pipeline": {
        name: None for name in ("CHECKPOINT_FORMAT", "DRIVERS", "MINILM", "MINILM_PACKAGE", "QUANTIZED_LAYERS",
                                "QUANTIZE_CONFIG", "SETTING_FLAGS", "Settings", "WEIGHTS", "add_settings_arguments",
                                "bits_per_weight", "block_linear_names", "calibration_texts",
                                "embedding_distillation_loss", "evaluate_model", "format_evaluation", "load_model",
                                "load_quantized", "minilm_dir", "quantize_efficientqat", "quantize_model",
                                "quantize_ptq161", "quantize_vq", "register_driver", "resolve_model_dir",
                                "save_quantized", "settings_overrides")
    } | {"QuantConfig": "blockops.quant.rtn", "quantize_": "blockops.quant.rtn",
         "load_gptq_checkpoint": "blockops.quant.gptq", "QuantLinear": "blockops.nn.quant_linear",
         "PTQ161Linear": "blockops.nn.ptq161_linear", "VQLinear": "blockops.nn.vq_linear"},
    "blockops.quant.report": {
        name: None for name in ("COSINE_TARGETS", "METHODS", "METRICS", "RECIPES", "TWO_BIT_METHODS", "budget",
                                "format_row", "main", "markdown", "merge", "plot", "row_settings", "run", "targets")
    },
}


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_old_names_are_the_new_homes_objects(module):
    mod = importlib.import_module(module)
    for name, home in OLD_NAMES[module].items():
        assert hasattr(mod, name), f"{module}.{name} is gone"
        if home is not None:
            new = importlib.import_module(home)
            assert getattr(mod, name) is getattr(new, name), f"{module}.{name} is not {home}.{name}"


# The __all__ of the user-facing namespaces before the split.
OLD_ALL = {
    "blockops": ["QuantConfig", "attention", "build_info", "cache", "dllm", "kernel_call_counts",
                 "load_gptq_checkpoint", "nn", "ops", "pack_bits", "ptq161", "quant", "quantize_", "unpack_bits", "vq"],
    "blockops.nn": ["BlockSparseAttention", "BlockSparseMultiheadAttention", "PTQ161Linear", "PaTHAttention",
                    "PaTHAttentionCache", "QuantLinear", "VQLinear", "swap_attention"],
    "blockops.attention": ["BLOCK_SIZES", "BlockMask", "Density", "PathCache", "and_masks", "block_sparse_attention",
                           "hilbert", "hilbert_order", "inverse_permutation", "masks", "or_masks", "path_attention",
                           "path_decode_step", "per_head", "reorder", "restore", "scaled_dot_product_attention"],
    "blockops.vq": ["CalibrationResult", "SoftVQLinear", "bits_per_weight", "blockwise_mse", "calibrate_blockwise",
                    "candidate_sets", "kmeans", "quantize_blocks", "vq_dequantize", "vq_linear"],
    "blockops.ptq161": ["FIELDS", "bits_per_weight", "ptq161_dequantize", "ptq161_linear", "quantize_weight",
                        "salient_count", "salient_padded"],
    "blockops.dllm": ["DiffusionKVCache", "GenerateOutput", "GenerationStats", "Unmasked", "generate",
                      "generate_block_diffusion", "kv_overwrite", "kv_overwrite_range", "unmask"],
    "blockops.cache": sorted(OLD_NAMES["blockops.cache"]),
    "blockops.quant": ["ptq161"],
    "blockops.quant.ptq161": ["block_loss", "collect_act_scales", "optimize_block", "quantization_preprocessing",
                              "quantize_linears"],
    "blockops.nn.path_attention": ["PaTHAttention", "PaTHAttentionCache"],
    "blockops.nn.block_sparse_attention": ["BlockSparseAttention", "BlockSparseMultiheadAttention", "MaskBuilder",
                                           "swap_attention"],
    "blockops.dllm.generate": ["DiffusionKVCache", "GenerateOutput", "GenerationStats", "generate",
                               "generate_block_diffusion"],
}


@pytest.mark.parametrize("module", sorted(OLD_ALL))
def test_all_keeps_every_name_it_had(module):
    """New names may be added; none was dropped."""
    mod = importlib.import_module(module)
    missing = set(OLD_ALL[module]) - set(mod.__all__)
    assert not missing, f"{module}.__all__ lost {sorted(missing)}"
    assert all(hasattr(mod, name) for name in mod.__all__)


def test_former_names_resolve():
    import blockops.cache as bc
    from blockops.nn.quant_linear import quantize_rtn
    from blockops.ops import block_sparse_attention_op, quant_linear
    from blockops.quant import pipeline, rtn

    assert bc.__all__ == blockops.block_cache.__all__
    assert all(getattr(bc, n) is getattr(blockops.block_cache, n) for n in bc.__all__)
    assert blockops.cache is bc and blockops.block_cache.relative_l1 is blockops.ops.block_cache.relative_l1
    assert quantize_rtn is rtn.quantize_rtn
    assert quant_linear is blockops.ops.lowbit.quant_linear
    assert block_sparse_attention_op is blockops.ops.attention.block_sparse_attention_op
    # The RTN pipeline driver is rtn_driver (quantize_rtn is the weight-level quantizer); its former name still works.
    assert pipeline.quantize_rtn is pipeline.rtn_driver is pipeline.DRIVERS["rtn"]
    assert rtn.quantize_rtn is not pipeline.rtn_driver


@pytest.mark.parametrize("module", ["blockops.quantize", "blockops.vq_calibration", "blockops.attention.path",
                                    "blockops.attention.path_attention",
                                    "blockops.dllm.ops", "blockops.cache.kernels", "blockops.cache.api"])
def test_moved_modules_are_gone(module):
    """Their names live on (above); the modules themselves moved (see blockops/quant/__init__.py)."""
    assert importlib.util.find_spec(module) is None


def test_op_layer_has_one_module_per_family():
    families = ["attention", "bitpack", "block_cache", "dllm", "lowbit", "path_attention", "ptq161", "vq"]
    package = os.path.dirname(blockops.ops.__file__)
    modules = sorted(f[:-3] for f in os.listdir(package) if f.endswith(".py") and not f.startswith("_"))
    assert modules == families
    for family in families:
        mod = importlib.import_module(f"blockops.ops.{family}")
        assert getattr(blockops.ops, family) is mod and mod.__all__, family
        assert all(hasattr(mod, n) for n in mod.__all__), family


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="no README.md next to tests/")
def test_every_name_in_the_readme_resolves():
    with open(README) as f:
        names = sorted(set(re.findall(r"blockops(?:\.[A-Za-z_][A-Za-z0-9_]*)+", f.read())))
    assert names
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"README names that no longer resolve: {missing}"
