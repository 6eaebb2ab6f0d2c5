"""Old names of moved code, kept working: bundles packed by an earlier release still run with today's package.

A bundle's configs name this package's code by dotted path (``_target_``, ``$`` expressions, ``$import``); once a
bundle is shared, those paths are frozen in it. When code moves, its old path gets an entry in one of the two tables
below instead of breaking those bundles:

- :data:`MOVED_MODULES`: a module that moved. ``import <old>`` (a bundle's ``imports``), ``<package>.<old>`` as an
  attribute (a ``$`` expression) and ``<old>.<Name>`` (a ``_target_``) all give the new module itself, through
  :class:`MovedModuleFinder` on ``sys.meta_path`` and the package's ``__getattr__``.
- :data:`MOVED_NAMES`: a single name that moved (re-exported elsewhere, or renamed). Served by the ``__getattr__`` of
  the module that now answers for the old name's module (``hybridmim_components/__init__.py`` installs
  :func:`moved_attribute` for the package; a module elsewhere installs it the same way when it needs an entry).

Using an old path warns with :class:`HybridMIMDeprecationWarning`, naming the old and the new path (an old module:
at its first import in a process). Only paths that no longer exist belong here: a module or name that still exists is
found before these tables are consulted, so an entry for it would never be used (the tests check that every entry is
really gone).
How to update an old bundle: ``docs/compatibility.md``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

__all__ = ["HybridMIMDeprecationWarning", "MOVED_MODULES", "MOVED_NAMES", "MovedModuleFinder", "moved_attribute",
           "new_path", "install"]

_P = "hybridmim_components"

#: old module -> new module (full dotted paths). Names inside keep their names.
MOVED_MODULES: dict[str, str] = {
    # release 0.1.0 (commit 432d705) -> the workflow subpackage
    f"{_P}.checkpoints": f"{_P}.workflow.checkpoints",
    f"{_P}.data": f"{_P}.workflow.data",
    f"{_P}.finetune_workflow": f"{_P}.workflow.finetune",
    f"{_P}.flags": f"{_P}.workflow.flags",
    f"{_P}.input_checks": f"{_P}.workflow.input_checks",
    f"{_P}.mixed_precision": f"{_P}.workflow.mixed_precision",
    f"{_P}.nonfinite": f"{_P}.workflow.nonfinite",
    f"{_P}.pretext_baselines": f"{_P}.workflow.pretext_baselines",
    f"{_P}.pretext_metrics": f"{_P}.workflow.pretext_metrics",
    f"{_P}.pretrain_workflow": f"{_P}.workflow.pretrain",
    f"{_P}.previews": f"{_P}.workflow.previews",
    f"{_P}.progress": f"{_P}.workflow.progress",
    f"{_P}.seeding": f"{_P}.workflow.seeding",
    # release 0.2.0: the weights into their subpackage, the plumbing into utils (the top level is the method)
    f"{_P}.merging": f"{_P}.weights.merging",
    f"{_P}.provenance": f"{_P}.weights.provenance",
    f"{_P}.public_weights": f"{_P}.weights.public_weights",
    f"{_P}.trained_settings": f"{_P}.weights.trained_settings",
    f"{_P}.transfer": f"{_P}.weights.transfer",
    f"{_P}.atomic_files": f"{_P}.utils.atomic_files",
    f"{_P}.distributed": f"{_P}.utils.distributed",
}

#: old name -> new name (full dotted paths: ``<module>.<name>``), for single names that moved or were renamed.
MOVED_NAMES: dict[str, str] = {
    # release 0.1.0 re-exported the config helper from the package; the bundles now name the workflow's
    f"{_P}.config_flag": f"{_P}.workflow.config_flag",
}


class HybridMIMDeprecationWarning(FutureWarning):
    """An old path of this package was used. A ``FutureWarning``, so that Python shows it by default: bundles run
    through MONAI's code, where a ``DeprecationWarning`` would be hidden."""


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(
        # "deprecated:" first: some libraries (ITK) print a warning's message alone, without its class
        f"deprecated: '{old}' moved to '{new}'; the old path still works until a later release removes it: "
        f"replace it in the bundle's configs (docs/compatibility.md).",
        HybridMIMDeprecationWarning,
        stacklevel=stacklevel + 1,  # the user's line (import machinery frames are skipped by ``warnings``)
    )


def new_path(old: str) -> str | None:
    """The current dotted path of ``old`` (a module, or a name inside one), or ``None`` when no entry moves it.

    ``hybridmim_components.data.load_datalist`` -> ``hybridmim_components.workflow.data.load_datalist``.
    """
    if old in MOVED_NAMES:
        return MOVED_NAMES[old]
    module = old
    while module:
        if module in MOVED_MODULES:
            return MOVED_MODULES[module] + old[len(module):]
        module = module.rpartition(".")[0]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module name as the new module object itself (one module, two names in ``sys.modules``)."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec):
        _warn(self.old, self.new, stacklevel=2)
        # the import system keeps the attributes a module already has (__name__, __spec__), so the new module stays
        # itself: classes, functions and isinstance checks are the very same objects under both names
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` finder for the old modules of :data:`MOVED_MODULES`. It sits after the standard finders, so
    it only answers for names no file provides."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def moved_attribute(module_name: str, name: str):
    """The object an old attribute ``<module_name>.<name>`` now is (with the warning), for a module's ``__getattr__``.

    Serves moved modules (``hybridmim_components.data`` without an import: a ``$`` expression) and the names of
    :data:`MOVED_NAMES`. Raises ``AttributeError`` for anything else, as a missing attribute would.
    """
    old = f"{module_name}.{name}"
    if old in MOVED_MODULES:
        return importlib.import_module(old)  # through MovedModuleFinder: warns, and sets the attribute on the package
    # a moved module is reached under its old names too: a name renamed inside it is listed under either
    aliases = [o for o, n in MOVED_MODULES.items() if n == module_name]
    old = next((f"{m}.{name}" for m in [module_name, *aliases] if f"{m}.{name}" in MOVED_NAMES), old)
    new = MOVED_NAMES.get(old)
    if new is None:
        raise AttributeError(f"module '{module_name}' has no attribute '{name}'")
    new_module, _, new_name = new.rpartition(".")
    value = getattr(importlib.import_module(new_module), new_name)
    _warn(old, new, stacklevel=3)  # here <- the module's __getattr__ <- the user's line
    # not cached on the module: every use passes here and warns (Python shows it once per calling line)
    return value


def install() -> None:
    """Put :class:`MovedModuleFinder` on ``sys.meta_path`` (once), after the standard finders."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
