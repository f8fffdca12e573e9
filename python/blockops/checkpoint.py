"""Per-block checkpoints shared by the block-by-block algorithms (EfficientQAT's Block-AP, PTQ1.61's block
optimisation, VQ4DiT's block-wise calibration): each finished block is written atomically with a record of the
settings and data it was made from, so that a killed run, started again with the same checkpoint folder, skips
the blocks already done and loses at most the block in progress; a checkpoint made with other settings or data
is refused rather than silently mixed in. Also the one reader of ``.safetensors`` files for the loaders
(`load_safetensors`, `safetensors_keys`): a malformed file is refused naming it."""
from __future__ import annotations

import hashlib
import os

import torch


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a reader (or a resumed run)
    sees either the old file or the complete new one, never a partial write."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(batches) -> str:
    """SHA-256 of every tensor (name, shape and bytes) in ``batches``: a list of tensors, dicts of tensors, or
    tuples / lists of those; other values are ignored."""
    digest = hashlib.sha256()

    def visit(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for k, v in sorted(value.items()):
                visit(f"{key}.{k}", v)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(f"{key}[{i}]", v)

    for batch in batches:
        visit("", batch)
    return digest.hexdigest()


def block_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"block_{index:04d}.pt")


def load_block(path: str, meta: dict, who: str, map_location=None) -> dict:
    """The checkpoint at ``path`` (``{"meta", "state", ...}`` as written by the algorithm), after checking that
    its ``meta`` equals this run's; raises ValueError naming ``who`` and the differing entries otherwise."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if saved.get("meta") != meta:
        old = saved.get("meta", {})
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        raise ValueError(f"{who}: checkpoint {path} was written with other settings or data {diff} "
                         "(checkpoint, this run); use a fresh checkpoint_dir")
    return saved


def _malformed(who: str, path: str, error: Exception) -> ValueError:
    return ValueError(f"{who}: checkpoint file {path} is not a readable .safetensors file: {error}")


def load_safetensors(path: str, who: str) -> dict:
    """Every tensor of the ``.safetensors`` file at ``path`` (on the CPU). A truncated or malformed file raises
    ValueError naming ``who`` and the file (the library's own SafetensorError names neither), chained to it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise _malformed(who, path, e) from e


def safetensors_keys(path: str, who: str) -> set:
    """The tensor names stored in the ``.safetensors`` file at ``path`` (header only); errors as `load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except SafetensorError as e:
        raise _malformed(who, path, e) from e
