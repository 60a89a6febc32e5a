// Concept Lab: front-end extension for ComfyUI (the PyPI front ends, comfyui-frontend-package
// 1.32 and newer, i.e. ComfyUI 0.3.75 and newer).
//
// What it does:
// - registers the extension "ConceptLab.Core";
// - adds one boolean setting, "ConceptLab.ShowBadge" (default on), declared in the extension's
//   `settings` array and read through app.extensionManager.setting;
// - while that setting is on, gives every node whose type starts with "ConceptLab" a pack colour
//   and marks it once as ours: the front end draws its own node-source badge on custom nodes
//   ("ConceptLab", Comfy.NodeBadge.NodeSourceBadgeMode), so a "Concept Lab" tag is added only
//   while that badge is turned off;
// - exposes window.ConceptLab = { version, extensionLoaded } for tests.
//
// Both renderers are served: the classic canvas and Nodes 2.0 (Comfy.VueNodes.Enabled, nodes
// drawn as Vue components, where onDrawForeground is never called). Everything goes through the
// node's model, which both read:
// - the tag is an entry of node.badges, a function evaluated on every draw (canvas) and read as
//   an extension badge (Nodes 2.0), so it follows both settings without re-creating nodes;
// - the colours are node.color / node.bgcolor, tracked properties whose changes the Vue nodes
//   pick up (they are assigned, never deleted: deleting one would remove the tracking).
import { app } from "../../scripts/app.js";

const VERSION = "0.1.0";
const EXTENSION_NAME = "ConceptLab.Core";
const SETTING_ID = "ConceptLab.ShowBadge";
const TYPE_PREFIX = "ConceptLab";
const BADGE_TEXT = "Concept Lab";
const SOURCE_BADGE_SETTING = "Comfy.NodeBadge.NodeSourceBadgeMode";
const COLORS = { title: "#3d2f66", body: "#241c3d", badgeFg: "#f2ecff", badgeBg: "#6a4fc4" };

window.ConceptLab = { version: VERSION, extensionLoaded: false };

// The tag per node, and which nodes we coloured (so turning the setting off only undoes our own
// colouring, never a colour the user picked).
const badgeByNode = new WeakMap();
const colouredByUs = new WeakSet();

// --- settings ---------------------------------------------------------------------------------
function settings() {
    return app?.extensionManager?.setting;
}

function isOn(value) {
    return value === undefined || value === null ? true : value !== false && value !== "false";
}

function badgeEnabled() {
    return isOn(settings()?.get?.(SETTING_ID));
}

// True while the front end draws its node-source badge on custom nodes (modes "None",
// "Hide built-in", "Show all"), so ours would be a second.
function frontEndShowsSourceBadge() {
    const store = settings();
    if (!store?.settings || !(SOURCE_BADGE_SETTING in store.settings)) return false;
    const mode = store.get(SOURCE_BADGE_SETTING);
    return mode !== undefined && mode !== null && mode !== "None";
}

// --- nodes ------------------------------------------------------------------------------------
function nodeType(node) {
    return node?.comfyClass ?? node?.constructor?.comfyClass ?? node?.type ?? "";
}

function isConceptLabNode(node) {
    const t = nodeType(node);
    return typeof t === "string" && t.startsWith(TYPE_PREFIX);
}

function graphNodes() {
    // app.graph is a plain getter (app.rootGraph logs an error before the graph exists).
    const list = app?.graph?.nodes ?? app?.graph?._nodes;
    return Array.isArray(list) ? list : [];
}

function redraw() {
    try {
        app?.graph?.setDirtyCanvas?.(true, true);
    } catch (_) {
        /* no canvas yet */
    }
}

function hasNoColour(value) {
    return value === undefined || value === null;
}

function applyColours(node, on) {
    if (on) {
        if (hasNoColour(node.color) && hasNoColour(node.bgcolor)) {
            node.color = COLORS.title;
            node.bgcolor = COLORS.body;
            colouredByUs.add(node);
        }
    } else if (colouredByUs.has(node)) {
        if (node.color === COLORS.title) node.color = undefined;
        if (node.bgcolor === COLORS.body) node.bgcolor = undefined;
        colouredByUs.delete(node);
    }
}

function makeBadge(text) {
    const Badge = window.LGraphBadge;
    if (typeof Badge !== "function") return null;
    try {
        return new Badge({ text, fgColor: COLORS.badgeFg, bgColor: COLORS.badgeBg });
    } catch (_) {
        return null;
    }
}

function attachTag(node) {
    if (badgeByNode.has(node) || !Array.isArray(node.badges)) return;
    const badge = makeBadge(BADGE_TEXT);
    const hidden = makeBadge("");      // an empty text is drawn (and listed) as no badge
    if (!badge || !hidden) return;
    node.badges.push(() => (badgeEnabled() && !frontEndShowsSourceBadge() ? badge : hidden));
    badgeByNode.set(node, badge);
}

function markNode(node) {
    if (!node || !isConceptLabNode(node)) return;
    attachTag(node);
    applyColours(node, badgeEnabled());
}

function refreshAllNodes(value) {
    const on = isOn(value);
    for (const node of graphNodes()) {
        if (!isConceptLabNode(node)) continue;
        attachTag(node);
        applyColours(node, on);
    }
    redraw();
}

// --- the extension ----------------------------------------------------------------------------
app.registerExtension({
    name: EXTENSION_NAME,
    settings: [{
        id: SETTING_ID,
        name: "Concept Lab: mark Concept Lab nodes",
        type: "boolean",
        defaultValue: true,
        tooltip: "Give Concept Lab nodes a purple colour and a 'Concept Lab' tag.",
        category: ["Concept Lab", "Appearance", "Mark Concept Lab nodes"],
        onChange: (value) => refreshAllNodes(value),
    }],
    setup() {
        refreshAllNodes(badgeEnabled());
    },
    nodeCreated(node) {
        try {
            markNode(node);
        } catch (err) {
            // Never let decoration break node creation.
            console.debug?.("Concept Lab: could not mark node", err);
        }
    },
});
window.ConceptLab.extensionLoaded = true;
