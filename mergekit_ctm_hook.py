"""Interpreter-startup hook that plugs mergekit-ctm into an unmodified mergekit.

Shipped as a top-level module and imported from ``mergekit_ctm.pth`` at interpreter start, so
it must stay cheap: it imports only ``sys``, ``os`` and ``importlib`` (no torch, no mergekit).

``install()`` puts a finder on ``sys.meta_path``. The finder lets the normal machinery locate
five mergekit modules and runs our code right after each has executed:

- ``mergekit.config``: give ``MergeConfiguration`` an optional ``output`` field, so the
  recipe key survives mergekit's configuration model for every caller.

- ``mergekit.merge_methods`` (the package, whose ``__init__`` imports the registry): register
  the ``ctm``, ``core_space``, ``mtc`` and ``lora_lego`` methods and the matrix rules.
- ``mergekit.merge``: wrap ``run_merge`` so recipes using our methods go to our planner.
  ``mergekit/scripts/run_yaml.py`` does ``from mergekit.merge import run_merge``, so the wrap
  must be in place before that module body returns.
- ``mergekit.scripts.run_yaml``: wrap the ``mergekit-yaml`` command so that bad recipes and
  failed merges end in one line instead of a traceback.
- ``mergekit.scripts.multimerge``: the same for ``mergekit-multi``.

``MERGEKIT_CTM_DISABLE=1`` turns the startup hook off (``mergekit_ctm.install()`` still works).
What runs after each module is ``mergekit_ctm.integration.CALLBACKS``.
A failure in our code is reported as a warning and never breaks mergekit itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

ENV_DISABLE = "MERGEKIT_CTM_DISABLE"


# Modules of mergekit after whose execution mergekit_ctm.integration.CALLBACKS[name] runs.
_HOOKED = (
    "mergekit.config",
    "mergekit.merge_methods",
    "mergekit.merge",
    "mergekit.scripts.run_yaml",
    "mergekit.scripts.multimerge",
)


def _run_callback(name: str, module: Any) -> None:
    try:
        from mergekit_ctm.integration import CALLBACKS

        CALLBACKS[name](module)
    except Exception as exc:  # never break mergekit because the plugin is broken
        import warnings

        warnings.warn(
            f"mergekit-ctm could not hook into {name}: {type(exc).__name__}: {exc}. "
            f"mergekit works without the ctm methods; set {ENV_DISABLE}=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PostExecLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callback on the executed module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _run_callback(self._name, module)

    def __getattr__(self, attr: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, attr)


class _MergekitFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the mergekit modules we hook."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PostExecLoader(spec.loader, fullname)
        return spec


_FINDER = _MergekitFinder()


def installed() -> bool:
    return _FINDER in sys.meta_path


def install() -> None:
    """Hook mergekit (idempotent). Modules already imported are handled immediately."""
    if not installed():
        sys.meta_path.insert(0, _FINDER)
    for name in _HOOKED:
        module = sys.modules.get(name)
        # A module mid-import has a spec marked _initializing; its loader runs the callback.
        if module is not None and not getattr(
            getattr(module, "__spec__", None), "_initializing", False
        ):
            _run_callback(name, module)


def install_from_pth() -> None:
    """Entry point of ``mergekit_ctm.pth``: install unless MERGEKIT_CTM_DISABLE is set."""
    if os.environ.get(ENV_DISABLE, "").strip().lower() in ("", "0", "false", "no"):
        install()
