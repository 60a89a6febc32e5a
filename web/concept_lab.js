// Concept Lab: front-end extension for ComfyUI.
//
// What it does:
// - registers the extension "ConceptLab.Core";
// - adds one boolean setting, "ConceptLab.ShowBadge" (default on);
// - while that setting is on, gives every node whose type starts with "ConceptLab" a pack colour
//   and marks it once as ours: the PyPI front ends draw their own node-source badge on custom
//   nodes ("ConceptLab", Comfy.NodeBadge.NodeSourceBadgeMode), so a "Concept Lab" tag is added
//   only where no such badge shows (the 2024 front end, or the source badge turned off);
// - exposes window.ConceptLab = { version, extensionLoaded } for tests.
//
// It runs on two generations of the ComfyUI front end:
// - the 2024 built-in front end (ComfyUI's own web/ folder): settings are added with
//   app.ui.settings.addSetting(), nodes have no badge list;
// - the 2025 PyPI front end (comfyui-frontend-package 1.2x): settings are declared in the
//   extension's `settings` array (addSetting still works there but is marked deprecated), values
//   are read through app.extensionManager.setting, and nodes carry a `badges` list drawn by the
//   canvas (window.LGraphBadge).
// Every API that only one of them has is looked up defensively.
import { app } from "../../scripts/app.js";

const VERSION = "0.1.0";
const EXTENSION_NAME = "ConceptLab.Core";
const SETTING_ID = "ConceptLab.ShowBadge";
const TYPE_PREFIX = "ConceptLab";
const BADGE_TEXT = "Concept Lab";
const SOURCE_BADGE_SETTING = "Comfy.NodeBadge.NodeSourceBadgeMode";
const COLORS = { title: "#3d2f66", body: "#241c3d", badgeFg: "#f2ecff", badgeBg: "#6a4fc4" };

window.ConceptLab = { version: VERSION, extensionLoaded: false };

// The tag object per node, and which nodes we coloured (so turning the setting off only undoes
// our own colouring, never a colour the user picked).
const badgeByNode = new WeakMap();
const colouredByUs = new WeakSet();

function settingDef() {
    return {
        id: SETTING_ID,
        name: "Concept Lab: mark Concept Lab nodes",
        type: "boolean",
        defaultValue: true,
        tooltip: "Give Concept Lab nodes a purple colour and a 'Concept Lab' tag.",
        category: ["Concept Lab", "Appearance", "Mark Concept Lab nodes"],
        onChange: (value) => refreshAllNodes(value),
    };
}

// --- settings ---------------------------------------------------------------------------------
function settingsDialog() {
    return app?.ui?.settings;
}

function settingIsRegistered() {
    // New front end: the workspace store lists every registered setting.
    const store = app?.extensionManager?.setting;
    if (store && store.settings && typeof store.settings === "object") {
        return SETTING_ID in store.settings;
    }
    // Old front end: the settings dialog keeps a plain lookup object.
    const lookup = settingsDialog()?.settingsLookup;
    return !!(lookup && typeof lookup === "object" && SETTING_ID in lookup);
}

function ensureSettingRegistered() {
    // The 2025 front end has already registered the setting from the `settings` array when the
    // extension was registered, so this only calls addSetting (deprecated there) on front ends
    // that ignore that array, i.e. the 2024 one.
    if (settingIsRegistered()) return;
    const dialog = settingsDialog();
    if (dialog && typeof dialog.addSetting === "function") {
        dialog.addSetting(settingDef());
    }
}

function badgeEnabled() {
    let value;
    const store = app?.extensionManager?.setting;
    if (store && typeof store.get === "function") {
        value = store.get(SETTING_ID);
    } else {
        const dialog = settingsDialog();
        // No default argument: the new front end warns when one is passed.
        if (dialog && typeof dialog.getSettingValue === "function") value = dialog.getSettingValue(SETTING_ID);
    }
    return value === undefined || value === null ? true : value !== false && value !== "false";
}

// True when the front end itself draws a node-source badge on custom nodes (front ends from
// mid-2024 on; its modes are "None", "Hide built-in" and "Show all"), so ours would be a second.
function frontEndShowsSourceBadge() {
    const store = app?.extensionManager?.setting;
    if (!store || typeof store.get !== "function") return false;
    if (store.settings && typeof store.settings === "object" && !(SOURCE_BADGE_SETTING in store.settings)) {
        return false;
    }
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
    // app.graph is a plain getter in both front ends (app.rootGraph would log an error before
    // the graph exists in the new one, so it is not used).
    const graph = app?.graph;
    const list = graph?._nodes ?? graph?.nodes;
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

function clearColour(node, key) {
    // Front ends up to 1.4x keep the colour as an own property of the node; 1.5x front ends
    // have an accessor over the node's tracked state, where only an assignment resets it.
    node[key] = undefined;
    if (Object.prototype.hasOwnProperty.call(node, key)) delete node[key];
}

function applyColours(node, on) {
    if (on) {
        if (hasNoColour(node.color) && hasNoColour(node.bgcolor)) {
            node.color = COLORS.title;
            node.bgcolor = COLORS.body;
            colouredByUs.add(node);
        }
    } else if (colouredByUs.has(node)) {
        if (node.color === COLORS.title) clearColour(node, "color");
        if (node.bgcolor === COLORS.body) clearColour(node, "bgcolor");
        colouredByUs.delete(node);
    }
}

function makeBadge() {
    const Badge = window.LGraphBadge;
    if (typeof Badge !== "function") return null;
    try {
        return new Badge({ text: BADGE_TEXT, fgColor: COLORS.badgeFg, bgColor: COLORS.badgeBg });
    } catch (_) {
        return null;
    }
}

function attachTag(node) {
    if (badgeByNode.has(node)) return;
    const badge = Array.isArray(node.badges) ? makeBadge() : null;
    if (badge) {
        // New front end: the canvas draws node.badges above the title; a function entry is
        // evaluated on every draw, so the tag follows both settings without re-creating nodes.
        const hidden = makeBadge();
        hidden.text = "";
        node.badges.push(() => (badgeEnabled() && !frontEndShowsSourceBadge() ? badge : hidden));
        badgeByNode.set(node, badge);
        return;
    }
    // Old front end: no badge list, so draw the tag in the title bar ourselves.
    const previous = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
        const result = previous?.apply(this, [ctx, ...rest]);
        if (badgeEnabled() && !this.flags?.collapsed) drawTitleTag(this, ctx);
        return result;
    };
    badgeByNode.set(node, true);
}

function drawTitleTag(node, ctx) {
    if (!ctx || typeof ctx.fillText !== "function" || !node.size || !(node.size.length >= 2)) return;
    const titleHeight = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    ctx.save();
    ctx.font = "10px sans-serif";
    const w = ctx.measureText(BADGE_TEXT).width + 10;
    const h = 14;
    const x = node.size[0] - w - 6;
    const y = -titleHeight + (titleHeight - h) / 2;
    ctx.fillStyle = COLORS.badgeBg;
    ctx.beginPath();
    if (typeof ctx.roundRect === "function") ctx.roundRect(x, y, w, h, 4);
    else ctx.rect(x, y, w, h);
    ctx.fill();
    ctx.fillStyle = COLORS.badgeFg;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(BADGE_TEXT, x + 5, y + h / 2 + 0.5);
    ctx.restore();
}

function markNode(node) {
    if (!node || !isConceptLabNode(node)) return;
    attachTag(node);
    applyColours(node, badgeEnabled());
}

function refreshAllNodes(value) {
    const on = value === undefined || value === null ? true : value !== false && value !== "false";
    for (const node of graphNodes()) {
        if (!isConceptLabNode(node)) continue;
        attachTag(node);
        applyColours(node, on);
    }
    redraw();
}

// --- the extension ----------------------------------------------------------------------------
const extension = {
    name: EXTENSION_NAME,
    // Read by the 2025 front end when the extension is registered; ignored by the 2024 one.
    settings: [settingDef()],
    init() {
        // 2024 front end: settings are loaded before init, and init runs before the first graph
        // is built, so the setting exists before any node is created.
        ensureSettingRegistered();
    },
    setup() {
        ensureSettingRegistered();
        refreshAllNodes(badgeEnabled());
    },
    nodeCreated(node) {
        try {
            markNode(node);
        } catch (err) {
            // Never let decoration break node creation; report once per failure without throwing.
            console.debug?.("Concept Lab: could not mark node", err);
        }
    },
};

app.registerExtension(extension);
window.ConceptLab.extensionLoaded = true;
