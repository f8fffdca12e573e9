"""Integrations with the libraries models are loaded with, registered through their public extension points.

``blockops.integrations.transformers``: a transformers quantizer (``quant_method: "blockops"``:
``save_pretrained`` / ``AutoModel.from_pretrained`` of models with `QuantLinear`, `VQLinear`, `PTQ161Linear` layers)
and the ``attn_implementation="blockops"`` attention backend (block-sparse attention over a `BlockMask`, combined
with transformers' padding mask). `register()` runs when blockops is imported, if transformers is installed.
"""
from __future__ import annotations

import importlib.util
import warnings


def register() -> bool:
    """Register every integration whose host library is installed; returns whether transformers' was. A failure
    (an incompatible transformers) is a warning, not an import error of blockops."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from blockops.integrations import transformers as _hf

        _hf.register()
        return True
    except Exception as e:   # noqa: BLE001  (blockops' kernels must stay importable whatever transformers is)
        warnings.warn(f"blockops: the transformers integration could not be registered: {e!r}", stacklevel=2)
        return False


__all__ = ["register"]
