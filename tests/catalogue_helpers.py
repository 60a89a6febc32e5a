"""The catalogue job's package (``conceptlab_catalogue``, at the pack root) for the tests,
imported by its path: the pack root itself never goes on sys.path."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "conceptlab_catalogue"


def catalogue(sub: str | None = None):
    """The package, or its module ``sub`` (e.g. ``"ledger"``)."""
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, ROOT / NAME / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / NAME)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{NAME}.{sub}") if sub else sys.modules[NAME]
