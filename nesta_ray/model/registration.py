"""Registering the low-rank classes with transformers' Auto classes, so that the ordinary
``AutoModelForCausalLM.from_pretrained(run)`` loads a nesta_ray run once nesta_ray is imported.

``import nesta_ray`` calls ``register_on_import``, which needs only the standard library, so the import stays cheap:
if transformers is already imported the classes are registered at once; otherwise an import hook registers them
right after transformers itself is first imported (that import then also loads torch and transformers' model
classes) and removes itself. ``register_auto_classes`` does it explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

MODELING_MODULE = "nesta_ray.model.modeling_nesta_lowrank"


def register_auto_classes() -> None:
    """Register NestaLowRankConfig with AutoConfig and NestaLowRankForCausalLM with AutoModelForCausalLM (again is
    harmless). Raises ImportError without transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nesta_ray.model.modeling_nesta_lowrank import MODEL_TYPE, NestaLowRankConfig, NestaLowRankForCausalLM

    AutoConfig.register(MODEL_TYPE, NestaLowRankConfig, exist_ok=True)
    AutoModelForCausalLM.register(NestaLowRankConfig, NestaLowRankForCausalLM, exist_ok=True)


def _register_or_warn() -> None:
    """Register, turning a failure into a warning: it runs inside an import, which must not break."""
    try:
        register_auto_classes()
    except Exception as err:  # noqa: BLE001 - reported, never swallowed
        warnings.warn(f"nesta_ray could not register its low-rank classes with transformers ({type(err).__name__}: "
                      f"{err}); load runs with nesta_ray.load_compressed or trust_remote_code=True",
                      RuntimeWarning, stacklevel=2)


def _importing(name: str) -> bool:
    """Whether module ``name`` is being imported right now (in sys.modules, its code still running)."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loaders of transformers and of the modeling module, and registers once
    transformers has been imported. When importing the modeling module is what imports transformers, the
    registration waits until the modeling module is complete (importing it earlier would be circular)."""

    WATCHED = ("transformers", MODELING_MODULE)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.WATCHED:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_then_register(module: ModuleType) -> None:
                run(module)
                if fullname == MODELING_MODULE or not _importing(MODELING_MODULE):
                    self.done()

            loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec

    def done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_or_warn()


def register_on_import() -> None:
    """Register now if transformers is imported, else as soon as it is (at most one hook is installed)."""
    if "transformers" in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
