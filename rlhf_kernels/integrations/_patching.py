"""Swapping drop-ins into another package's modules and back: the machinery behind ``patch_trl`` and
``patch_openrlhf``.

A package's helpers live in one home module (``trl.trainer.utils``, ``openrlhf.models.utils``), and other modules
of the package bind them by name at import (``from .utils import compute_entropy``). A patch replaces each
original wherever a loaded module of the package holds it, so both the home module (and modules imported later,
which copy from it) and the earlier importers call the drop-in; restoring puts the originals back everywhere,
including in modules imported while the patch was on.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List


def package_modules(package: str) -> list:
    """The loaded modules of ``package`` (the package itself and its submodules)."""
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == package or name.startswith(package + "."))]


class ModulePatch:
    """Replaces attributes of ``home`` (a module name inside ``package``) by ``replacements`` in every loaded module
    of ``package`` that holds the original; a context manager that restores them.

    Patches nest per subclass: while one is active, another does nothing, and only the outermost one restores.
    Importing ``home`` raises ``ImportError`` when the package is absent, which is the message a caller wants.
    Subclasses set ``package``, ``home`` and ``_active`` (their own list of live handles).
    """

    package: str = ""
    home: str = ""
    _active: List["ModulePatch"] = []

    def __init__(self, replacements: Dict[str, Callable]):
        home = importlib.import_module(self.home)
        self._replacements = dict(replacements)
        self._saved: List[tuple] = []
        self._originals: Dict[str, object] = {}
        self._owner = not self._active
        if self._owner:
            for name, replacement in self._replacements.items():
                original = getattr(home, name, None)
                if original is not None and original is not replacement:
                    self._originals[name] = original
            for module in package_modules(self.package):
                for name, original in self._originals.items():
                    if getattr(module, name, None) is original:
                        setattr(module, name, self._replacements[name])
                        self._saved.append((module, name, original))
        self._active.append(self)

    @property
    def patched(self) -> List[str]:
        """``"module.attr"`` of every attribute this handle replaced."""
        return [f"{module.__name__}.{name}" for module, name, _ in self._saved]

    def restore(self) -> None:
        """Put the originals back (a no-op when already restored, or when this is not the outermost patch)."""
        if self not in self._active:
            return
        self._active.remove(self)
        if not self._owner:
            return
        for module, name, original in self._saved:
            setattr(module, name, original)
        # Modules imported while patched copied the drop-ins; give them the originals too.
        for module in package_modules(self.package):
            for name, original in self._originals.items():
                if getattr(module, name, None) is self._replacements[name]:
                    setattr(module, name, original)
        self._saved = []

    def __enter__(self) -> "ModulePatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @classmethod
    def restore_all(cls) -> None:
        """Undo every active patch of this kind."""
        for handle in reversed(list(cls._active)):
            handle.restore()
