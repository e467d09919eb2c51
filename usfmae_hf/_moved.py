"""Old import paths of modules that moved in 0.2, kept working for one release with a DeprecationWarning.

A finder placed first on ``sys.meta_path`` answers an old name with the module at its new home, so
``import usfmae_hf.weights`` and ``usfmae_hf.model.keys`` are the same module object (never a
second copy with its own state).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old module name -> new module name
MOVED_MODULES = {
    "usfmae_hf.weights": "usfmae_hf.model.keys",
    "usfmae_hf.checkpoints": "usfmae_hf.model.checkpoints",
    "usfmae_hf.conversion": "usfmae_hf.model.conversion",
    "usfmae_hf.reference_mae": "usfmae_hf.model.reference_mae",
    "usfmae_hf.loading": "usfmae_hf.model.loading",
    "usfmae_hf.preprocessing": "usfmae_hf.image.processor",
    "usfmae_hf.augment": "usfmae_hf.image.augment",
    "usfmae_hf.ultrasound": "usfmae_hf.image.cleanup",
    "usfmae_hf.catalogue": "usfmae_hf.ingest.catalogue",
    "usfmae_hf.probe": "usfmae_hf.evaluation.probe",
    "usfmae_hf.data": "usfmae_hf.evaluation",
    "usfmae_hf.data.adapters": "usfmae_hf.evaluation.adapters",
    "usfmae_hf.data.leakage": "usfmae_hf.evaluation.leakage",
    "usfmae_hf.data.hashing": "usfmae_hf.io.hashing",
    "usfmae_hf.metrics": "usfmae_hf.evaluation.metrics",
    "usfmae_hf.finetuning.crossval": "usfmae_hf.evaluation.crossval",
    "usfmae_hf.finetuning.reporting": "usfmae_hf.evaluation.reporting",
    "usfmae_hf.cards": "usfmae_hf.publishing.cards",
    "usfmae_hf.hub": "usfmae_hf.publishing.hub",
    "usfmae_hf.quickstart_report": "usfmae_hf.quickstart.report",
    "usfmae_hf.model_cards": "usfmae_hf.publishing.templates",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.module.__name__}; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        # The module already ran at its new home. The import system has just pointed its __spec__ at
        # the old name; give it back its own, which importlib.resources and pickling rely on.
        module.__spec__ = self.spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        module = importlib.import_module(new_name)
        is_package = hasattr(module, "__path__")
        spec = importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(module), is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(module.__path__)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
