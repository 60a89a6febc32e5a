// Concept Lab: workflows saved before a combo became an io.DynamicCombo load with every value in
// its place (ComfyUI 0.33; does nothing where the server sends no DynamicCombo, e.g. 0.3.75).
//
// Mask From Concept's 'threshold_mode' is a DynamicCombo on ComfyUI 0.33: its options 'fixed' and
// 'argmax' carry the widget 'threshold_mode.threshold', 'mean' and 'otsu' carry none. Before, the
// node had the two flat widgets 'threshold_mode' and 'threshold', and saved
//     widgets_values = [concept, "mean", 0.5, grow, refine]
// The front end restores widgets_values by position (LGraphNode.configure; 1.48 and 1.58 alike),
// and setting the combo to 'mean' removes the threshold widget first, so 0.5 went to 'grow', grow's
// value to 'refine' and refine's was lost (measured: tests/e2e/test_dynamic_combo_front_end.py).
// A node saved with the DynamicCombo writes [concept, "mean", grow, refine]; for 'fixed' and
// 'argmax' both layouts are the same.
//
// So, before the front end configures a ConceptLab node from saved data, the saved values of each
// DynamicCombo are read in the old flat layout when they are in it: the carried inputs' values are
// kept for those the chosen option carries (in the option's order) and dropped for the others (the
// node ignored them in that mode). A saved list is in the old layout when it has the old layout's
// length and not the new one's, or, when both lengths agree (a workflow saved before a later
// widget existed), when only the old layout's reading gives every widget a value of its type.
import { app } from "../../../scripts/app.js";

const TYPE_PREFIX = "ConceptLab";
const DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3";

// ---- the node definition ----------------------------------------------------------------------
function inputSpec(nodeData, name) {
    const input = nodeData?.input ?? {};
    return input.required?.[name] ?? input.optional?.[name];
}

function optionInputs(option) {
    const inputs = option?.inputs ?? {};
    return [inputs.required, inputs.optional].flatMap((section) => Object.entries(section ?? {}));
}

// {combo name: {carried: {option: [[name, spec], ...]}, all: [[name, spec], ...]}} of the node's
// DynamicCombos ('all': every input any option carries, once, in order: the old flat widgets).
function dynamicCombos(nodeData) {
    const out = {};
    for (const section of ["required", "optional"]) {
        for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
            if (!Array.isArray(spec) || spec[0] !== DYNAMIC_COMBO) continue;
            const carried = {}, all = [], seen = new Set();
            for (const option of spec[1]?.options ?? []) {
                carried[option.key] = optionInputs(option);
                for (const [n, s] of carried[option.key]) {
                    if (!seen.has(n)) { seen.add(n); all.push([n, s]); }
                }
            }
            out[name] = { carried, all };
        }
    }
    return out;
}

// ---- does a saved value fit a widget? ---------------------------------------------------------
function comboChoices(spec) {
    if (Array.isArray(spec?.[0])) return spec[0];
    if (spec?.[0] === "COMBO" || spec?.[0] === DYNAMIC_COMBO) {
        const options = spec[1]?.options ?? [];
        return options.map((o) => (o && typeof o === "object" ? o.key : o));
    }
    return null;
}

function fits(value, spec) {
    if (!Array.isArray(spec)) return true;             // not an input of the definition
    const choices = comboChoices(spec);
    if (choices) return choices.includes(value);
    switch (spec[0]) {
        case "INT": return typeof value === "number" && Number.isInteger(value);
        case "FLOAT": return typeof value === "number";
        case "STRING": return typeof value === "string";
        case "BOOLEAN": return typeof value === "boolean";
        default: return true;
    }
}

function allFit(values, specs) {
    return specs.every((spec, i) => i >= values.length || fits(values[i], spec));
}

// ---- the migration ----------------------------------------------------------------------------
// ``values`` in the layout of today's widgets (``widgets``: the node's widgets as created, with
// each DynamicCombo at its default option), or ``values`` itself where nothing is to be moved.
function migrateValues(nodeData, combos, widgets, values) {
    const saved = widgets.filter((w) => w && w.serialize !== false);
    let out = values;
    for (const [combo, { carried, all }] of Object.entries(combos)) {
        const at = saved.findIndex((w) => w.name === combo);
        if (at < 0 || at >= out.length) continue;
        const chosen = carried[out[at]];
        if (!chosen || chosen.length === all.length) continue;     // an unknown option, or the same layout
        const inGroup = (w) => typeof w.name === "string" && w.name.startsWith(`${combo}.`);
        const before = saved.slice(0, at + 1);
        const rest = saved.slice(at + 1).filter((w) => !inGroup(w)).map((w) => inputSpec(nodeData, w.name));
        const tail = out.slice(at + 1);
        const oldLength = all.length + rest.length, newLength = chosen.length + rest.length;
        const oldFits = allFit(tail, [...all.map(([, s]) => s), ...rest]);
        const newFits = allFit(tail, [...chosen.map(([, s]) => s), ...rest]);
        const old = (tail.length === oldLength && tail.length !== newLength) || (oldFits && !newFits);
        if (!old) continue;
        const flat = Object.fromEntries(all.map(([n], i) => [n, tail[i]]));
        out = [...out.slice(0, before.length), ...chosen.map(([n]) => flat[n]), ...tail.slice(all.length)];
    }
    return out;
}

app.registerExtension({
    name: "ConceptLab.DynamicComboMigration",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (!String(nodeData?.name ?? "").startsWith(TYPE_PREFIX)) return;
        const combos = dynamicCombos(nodeData);
        if (!Object.keys(combos).length) return;
        const configure = nodeType.prototype.configure;
        if (typeof configure !== "function") return;
        nodeType.prototype.configure = function (info) {
            let data = info;
            try {
                const values = info?.widgets_values;
                if (Array.isArray(values)) {
                    const moved = migrateValues(nodeData, combos, this.widgets ?? [], values);
                    if (moved !== values) data = { ...info, widgets_values: moved };
                }
            } catch (err) {
                console.debug?.("Concept Lab: could not read the saved widget values", err);
            }
            return configure.call(this, data, ...Array.prototype.slice.call(arguments, 1));
        };
    },
});
