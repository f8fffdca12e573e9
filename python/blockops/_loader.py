"""Loads the compiled library blockops._C and checks that it matches the running torch.

Importing the library registers every op with torch's dispatcher. Nothing here touches a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch

_BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or run `bash tools/setup.sh`, which also creates the virtual environment)."
)


def _torch_release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the part of torch's version that fixes its C++ ABI."""
    return version.split("+")[0]


def load():
    if importlib.util.find_spec("blockops._C") is None:
        raise ImportError(
            f"blockops: the compiled library blockops._C is missing from {os.path.dirname(__file__)}. "
            + _BUILD_HINT
        )
    try:
        _C = importlib.import_module("blockops._C")  # loading it registers the ops
    except (ImportError, OSError) as e:
        raise ImportError(
            f"blockops: the compiled library failed to load ({e}). It was probably built for another "
            f"torch than the installed {torch.__version__}. " + _BUILD_HINT
        ) from e
    info = json.loads(_C.build_info_json())
    if _torch_release(info["torch_version"]) != _torch_release(torch.__version__):
        raise ImportError(
            f"blockops: the compiled library was built for torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed. " + _BUILD_HINT
        )
    return _C, info
