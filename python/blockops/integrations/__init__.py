"""Integrations with the libraries models are loaded with, registered through their public extension points.

``blockops.integrations.transformers``: a transformers quantizer (``quant_method: "blockops"``:
``save_pretrained`` / ``AutoModel.from_pretrained`` of models with `QuantLinear`, `VQLinear`, `PTQ161Linear` layers)
and the ``attn_implementation="blockops"`` attention backend (block-sparse attention over a `BlockMask`, combined
with transformers' padding mask).

`register()` runs when blockops is imported. If transformers is already imported it registers at once; if it is
only installed, registration waits until transformers itself is imported (a post-import hook on ``sys.meta_path``),
so ``import blockops`` does not pay for importing transformers (about 1.7 s) in programs that never use it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_registered = False


def _register_transformers() -> bool:
    """Registers the transformers integration now; a failure (an incompatible transformers) is a warning, not an
    import error of blockops."""
    global _registered
    if _registered:
        return True
    try:
        from blockops.integrations import transformers as _hf

        _hf.register()
        _registered = True
        return True
    except Exception as e:   # noqa: BLE001  (blockops' kernels must stay importable whatever transformers is)
        warnings.warn(f"blockops: the transformers integration could not be registered: {e!r}", stacklevel=2)
        return False


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is looked up, it hands back the regular spec with the loader
    wrapped, so that the integration registers right after transformers' own ``__init__`` has run (and the finder
    then leaves ``sys.meta_path``). It stays in place until then: ``importlib.util.find_spec("transformers")``
    (libraries probing whether transformers is installed) looks it up without importing it."""

    def __init__(self):
        self._looking = False   # guards the lookup below, which goes through sys.meta_path again

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module
        finder = self

        def exec_module(module):
            loader_exec(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            _register_transformers()

        spec.loader.exec_module = exec_module
        return spec


def register() -> bool:
    """Registers every integration whose host library is imported, or arranges for it to register when that
    library is imported; returns whether transformers' integration is registered now."""
    if "transformers" in sys.modules:
        return _register_transformers()
    if importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
    return False


__all__ = ["register"]
