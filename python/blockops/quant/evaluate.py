"""Quality and speed of a quantized sentence encoder against its full-precision original.

Embeddings are sentence-transformers' (mean of the last hidden states over the non-padding tokens, then L2
normalised). Quality: cosine between the two models' embeddings of each evaluation sentence, and agreement of
nearest-neighbour retrieval among the evaluation sentences (each sentence queries all the others). Speed: every
distinct quantized layer shape against a dense fp32 ``F.linear`` of the same weight, plus encoding the whole
evaluation split with each model, measured in the same run."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from blockops.bench.harness import time_ms
from blockops.nn.quant_linear import QuantLinear

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The tokenizer's tensors of ``batch`` (batches may carry extra entries, e.g. distillation targets)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sentence_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    """``[batch, hidden]`` L2-normalised mean-pooled last hidden states (differentiable)."""
    hidden = model(**model_inputs(batch)).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([sentence_embeddings(model, b) for b in batches])


def retrieval_agreement(reference: torch.Tensor, test: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Each row queries all other rows by cosine. Returns ``(top1, topk)``: the fraction of queries whose
    nearest neighbour under ``test`` is the one under ``reference``, and the mean overlap of the two models'
    ``k`` nearest neighbours (``|ref_k & test_k| / k``)."""
    if reference.shape != test.shape or reference.shape[0] <= k:
        raise ValueError(f"retrieval_agreement: need matching [n > {k}, d] embeddings, got "
                         f"{tuple(reference.shape)} and {tuple(test.shape)}")
    eye = torch.eye(reference.shape[0], dtype=torch.bool)

    def neighbours(e):
        sim = e @ e.t()
        return sim.masked_fill(eye, float("-inf")).topk(k, dim=1).indices

    ref_nn, test_nn = neighbours(reference.float()), neighbours(test.float())
    top1 = (ref_nn[:, 0] == test_nn[:, 0]).float().mean().item()
    overlap = (ref_nn.unsqueeze(2) == test_nn.unsqueeze(1)).any(2).float().sum(1) / k
    return top1, overlap.mean().item()


def quality(reference: torch.Tensor, test: torch.Tensor) -> dict:
    """Cosine (mean and minimum over sentences) and retrieval agreement of normalised embeddings."""
    cosine = (reference * test).sum(-1)
    top1, top5 = retrieval_agreement(reference, test, 5)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(), "top1_agreement": top1,
            "top5_overlap": top5, "num_sentences": reference.shape[0]}


@torch.no_grad()
def layer_speed(model: nn.Module, rows: tuple[int, ...] = (1, 512)) -> list[dict]:
    """Each distinct quantized layer configuration of ``model``, at ``rows`` input rows (1: one token; 512: a
    batch of sentences), timed against ``F.linear`` with its dequantized weight in fp32."""
    seen, results = set(), []
    for layer in model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        key = (layer.in_features, layer.out_features, layer.bits, layer.group_size)
        if key in seen:
            continue
        seen.add(key)
        weight = layer.dequantize().float()
        bias = None if layer.bias is None else layer.bias.float()
        for n in rows:
            x = torch.randn(n, layer.in_features)
            quant = time_ms(lambda: layer(x), "cpu")
            dense = time_ms(lambda: F.linear(x, weight, bias), "cpu")
            results.append({"shape": f"{layer.in_features}x{layer.out_features}", "bits": layer.bits,
                            "group_size": layer.group_size, "rows": n, "quant_ms": quant, "dense_fp32_ms": dense,
                            "speedup": dense / quant})
    return results


@torch.no_grad()
def encode_seconds(model: nn.Module, batches: list[dict], repeats: int = 3) -> float:
    """Median wall time of embedding all ``batches`` once."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed(model, batches)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
