"""Calibration and evaluation text that ships with CPython: the documentation topics of `pydoc_data.topics`,
split into prose sentences, shuffled with a fixed seed and cut into disjoint calibration and evaluation splits.

The sentence list depends only on the Python version's copy of the docs, so every run on one interpreter sees
the same splits."""
from __future__ import annotations

import random
import re

import torch

# A sentence ends at . ! or ? followed by white space and an upper-case letter, a quote or a parenthesis.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# Underlines of reStructuredText headings ("*****", "=====", "-----").
_HEADING_RULE = re.compile(r"^([*=\-~^])\1{3,}$")
MIN_CHARS, MAX_CHARS, MIN_WORDS = 40, 400, 6
# Code and grammar lines are mostly punctuation; prose is mostly letters and spaces.
MIN_LETTER_FRACTION = 0.85
SPLIT_SEED = 0
EVAL_SIZE = 400   # sentences held out for evaluation; the other ~1500 are for calibration


def _paragraphs(text: str):
    """Blank-line separated paragraphs (indented ones too: definition bodies are indented like code, so code
    is told apart per sentence by its punctuation), headings dropped."""
    paragraph: list[str] = []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if not stripped or _HEADING_RULE.match(stripped):
            if paragraph:
                yield " ".join(paragraph)
            paragraph = []
            continue
        paragraph.append(stripped)


def _is_prose(sentence: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return (MIN_CHARS <= len(sentence) <= MAX_CHARS and len(sentence.split()) >= MIN_WORDS
            and sentence[-1] in ".!?" and letters >= MIN_LETTER_FRACTION * len(sentence))


def sentences() -> list[str]:
    """Every distinct prose sentence of the CPython documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for paragraph in _paragraphs(topics[key]):
            if ">>>" in paragraph or "::=" in paragraph:   # interactive examples and grammar rules
                continue
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = " ".join(sentence.split()).removeprefix("* ")
                if _is_prose(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def splits(num_eval: int | None = None, num_calib: int | None = None) -> dict[str, list[str]]:
    """Disjoint ``{"calib": [...], "eval": [...]}``: the sentences shuffled with a fixed seed; the first
    `EVAL_SIZE` form the evaluation split (of which the first ``num_eval`` are returned), all the others the
    calibration split (the first ``num_calib`` returned). The boundary is fixed, so the splits stay disjoint
    whatever the requested sizes."""
    pool = sentences()
    random.Random(SPLIT_SEED).shuffle(pool)
    evaluation, calibration = pool[:EVAL_SIZE], pool[EVAL_SIZE:]
    for name, count, split in (("num_eval", num_eval, evaluation), ("num_calib", num_calib, calibration)):
        if count is not None and not 1 <= count <= len(split):
            raise ValueError(f"splits: {name}={count} must be in [1, {len(split)}]")
    return {"calib": calibration[:num_calib], "eval": evaluation[:num_eval]}


def tokenize_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 64) -> list[dict]:
    """``texts`` in order, as batches of ``{"input_ids", "attention_mask", ...}`` tensors (padded per batch)."""
    if batch_size < 1:
        raise ValueError(f"tokenize_batches: batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
    return batches
