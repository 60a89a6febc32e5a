"""The V3 node schema (``comfy_api``) for every Concept Lab node, on every supported ComfyUI.

The nodes import ``comfy_api.v0_0_2``, the pinned API version that ComfyUI 0.3.75 and 0.33 both
ship. It re-exports each version's own ``comfy_api.latest.io``, and those differ; what the nodes
use beyond what both have is detected here, once:

- ``io.Autogrow`` (0.33): inputs that grow as the user connects them. 0.3.75 has only the older
  ``AutogrowDynamic``; there the same names are fixed optional inputs (:func:`numbered_inputs`).
- ``search_aliases`` on the schema (0.33): what the node search also matches. 0.3.75's
  ``Schema`` has no such field and its server sends none (:func:`schema` drops them there).
- ``advanced=True`` on an input (0.33): shown under the node's advanced inputs. 0.3.75 has no
  such flag (:data:`ADVANCED` is empty there).

Workflows saved before the nodes moved to V3 keep their input names: on a ComfyUI with Autogrow
the numbered inputs of an old workflow (``references_2``, ``concept_3``, ...) reach ``execute``
under their old names, as ComfyUI passes every linked input; :func:`numbered_values` merges both.
"""
from __future__ import annotations

import dataclasses
import inspect

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)

HAS_AUTOGROW = hasattr(io, "Autogrow")
HAS_SEARCH_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Combo.Input.__init__).parameters else {}


def schema(**fields) -> io.Schema:
    """``io.Schema(**fields)``, without the fields this ComfyUI's schema does not have."""
    if not HAS_SEARCH_ALIASES:
        fields.pop("search_aliases", None)
    return io.Schema(**fields)


def numbered_inputs(group: str, names, make) -> list:
    """Optional inputs ``names`` (e.g. ``references_2``, ``references_3``) made by
    ``make(name)``: one ``io.Autogrow`` group ``group`` where ComfyUI has it (the next input
    appears when the previous one is connected; the front end labels each by its name), else the
    same names as fixed optional inputs."""
    if HAS_AUTOGROW:
        template = io.Autogrow.TemplateNames(make(names[0]), list(names), min=0)
        return [io.Autogrow.Input(group, template=template, optional=True)]
    return [make(n) for n in names]


def numbered_values(grown, names, **by_name) -> dict:
    """``{name: value}`` of the connected numbered inputs, in ``names`` order: from the Autogrow
    group's dict (``grown``, ComfyUI 0.33) and from inputs passed by their own name (ComfyUI
    0.3.75, and workflows saved before the V3 nodes, on any version)."""
    grown = grown if isinstance(grown, dict) else {}
    out = {}
    for n in names:
        value = by_name.get(n)
        if value is None:
            value = grown.get(n)
        if value is not None:
            out[n] = value
    return out


def node_id(cls) -> str | None:
    """The id of the graph node running ``cls.execute`` (ComfyUI's hidden UNIQUE_ID), or None
    when the node's code is called directly (tests, benchmarks)."""
    return getattr(getattr(cls, "hidden", None), "unique_id", None)
