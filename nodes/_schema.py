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
- ``io.DynamicCombo`` (0.33): a combo whose options carry their own inputs, shown only while that
  option is chosen (:func:`choice_inputs`). 0.3.75 has none; there the combo and the carried
  inputs are flat inputs, as before.

Workflows saved before the nodes moved to V3 keep their input names: on a ComfyUI with Autogrow
the numbered inputs of an old workflow (``references_2``, ``concept_3``, ...) reach ``execute``
under their old names, as ComfyUI passes every linked input; :func:`numbered_values` merges both.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)

HAS_AUTOGROW = hasattr(io, "Autogrow")
HAS_SEARCH_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
#: ``io.DynamicCombo``, with ``accept_all_inputs`` on the schema, which lets a prompt of the old
#: flat form (``threshold_mode`` and ``threshold`` side by side) still reach ``execute``.
HAS_DYNAMIC_COMBO = hasattr(io, "DynamicCombo") and "accept_all_inputs" in {f.name for f in dataclasses.fields(io.Schema)}
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Combo.Input.__init__).parameters else {}


def _v3_combos_checked() -> bool:
    """Whether ComfyUI's prompt validation refuses a value outside a V3 combo's options (0.33), or
    only outside a combo declared the V1 way, with the options list as its type (0.3.75)."""
    try:
        import execution
        return "Combo.io_type" in inspect.getsource(execution.validate_inputs)
    except Exception:  # noqa: BLE001  (unreadable source: declare combos the V1 way, checked everywhere)
        return False


V3_COMBOS_CHECKED = _v3_combos_checked()


class _ListCombo(io.Combo.Input):
    """A combo whose type is its options list, as V1 declares combos: the form every ComfyUI's
    validation checks a value against."""

    def get_io_type(self):
        return list(self.options)


def combo(id: str, options, **kw) -> io.Combo.Input:
    """A combo input (``io.Combo.Input``). Where ComfyUI validates only V1-style combos (0.3.75),
    it is declared the V1 way, so that a value outside the menu (a typo in a /prompt call, a file
    that is gone) is still refused before the prompt runs, with ComfyUI's own message."""
    return (io.Combo.Input if V3_COMBOS_CHECKED else _ListCombo)(id, options=list(options), **kw)


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
        first = make(names[0])
        template = io.Autogrow.TemplateNames(first, list(names), min=0)
        return [io.Autogrow.Input(group, template=template, optional=True, tooltip=first.tooltip)]
    fixed = [make(n) for n in names]
    for inp in fixed:       # which group they stand for (benchmarks/locales.py: one set of texts for both)
        inp.extra_dict = dict(inp.extra_dict or {}, autogrow_group=group)
    return fixed


def choice_inputs(id: str, options, default: str, tooltip: str, carried: list, used_by) -> list:
    """A combo ``id`` whose options ``used_by`` use the inputs ``carried`` (e.g. ``threshold_mode``:
    only 'fixed' and 'argmax' use ``threshold``).

    Where ComfyUI has ``io.DynamicCombo`` (0.33): one DynamicCombo; the carried inputs appear under
    the options that use them (the front end shows them while one of those is chosen and names them
    ``<id>.<name>``), optional, so that a prompt of the old flat form still validates. The front end
    makes a DynamicCombo's first option its default, so ``default`` comes first. The node's schema
    needs ``**ACCEPT_OLD_NAMES`` (the flat ``<name>`` of saved workflows) and its ``execute`` reads
    the values with :func:`chosen`. Without DynamicCombo (0.3.75): the combo and the carried inputs,
    flat, as before (marked ``dynamic_combo``: benchmarks/locales.py gives both forms one set of
    texts)."""
    options, used_by = list(options), list(used_by)
    if HAS_DYNAMIC_COMBO:
        def nested():
            out = []
            for inp in carried:
                inp = copy.copy(inp)
                inp.optional = True
                out.append(inp)
            return out
        order = [default] + [o for o in options if o != default]
        return [io.DynamicCombo.Input(
            id, options=[io.DynamicCombo.Option(o, nested() if o in used_by else []) for o in order],
            tooltip=tooltip, extra_dict={"default": default})]
    flat = [combo(id, options, default=default, tooltip=tooltip)]
    for inp in carried:
        inp.extra_dict = dict(inp.extra_dict or {}, dynamic_combo=id, dynamic_options=used_by)
        flat.append(inp)
    return flat


#: Schema fields for a node with :func:`choice_inputs` (0.33: every input of the prompt reaches
#: ``execute``, the old flat names of saved workflows too).
ACCEPT_OLD_NAMES = {"accept_all_inputs": True} if HAS_DYNAMIC_COMBO else {}


def chosen(value, id: str, **flat) -> tuple:
    """``(option, {carried input: value})`` of a :func:`choice_inputs` combo: from the DynamicCombo's
    dict (``{id: option, name: value}``, ComfyUI 0.33) or the plain option (0.3.75), with the
    carried inputs sent flat (0.3.75, and prompts saved before, on any version) where the dict has
    none."""
    if isinstance(value, dict):
        option = value.get(id)
        carried = {k: v for k, v in value.items() if k != id and v is not None}
    else:
        option, carried = value, {}
    for k, v in flat.items():
        if v is not None:
            carried.setdefault(k, v)
    return option, carried


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


def graph_node_id(cls) -> str | None:
    """The id of the graph node running ``cls.execute`` (ComfyUI's hidden UNIQUE_ID), or None
    when the node's code is called directly (tests, benchmarks)."""
    return getattr(getattr(cls, "hidden", None), "unique_id", None)


#: The memory strategies of the nodes that run gradients through the model (Extract, Seed
#: Search), least saving first; "auto" picks one from the memory ComfyUI has free.
MEMORY_MODES = ("auto", "full", "recompute casts", "checkpoint", "checkpoint + offload")


def memory_input() -> io.Combo.Input:
    """The advanced ``memory`` input of Extract and Seed Search (the last input: workflows saved
    before it existed keep every widget value in place, and /prompt calls without it get auto)."""
    return combo(
        "memory", MEMORY_MODES, default="auto", optional=True,
        tooltip="How the gradient passes trade time for memory. auto: chosen from the memory ComfyUI "
                "has free. full: keep everything (fastest). recompute casts: recompute low-precision "
                "weight casts in backward instead of keeping them. checkpoint: recompute the model's "
                "blocks in backward. checkpoint + offload: also keep what backward needs in CPU memory. "
                "Each step down needs less memory and more time.",
        **ADVANCED)
