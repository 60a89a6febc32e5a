// Concept Lab: the attention-saliency viewer on "ConceptLab Saliency Maps" nodes.
//
// The node's Python side (nodes/saliency.py, _viewer_payload) writes the decoded images and
// one grey-scale map per image and word as PNGs into ComfyUI's temp folder and returns
//   {"ui": {"concept_lab_saliency": [{words, method, threshold, images: [ref], maps: [[ref]]}]}}
// where a ref is {filename, subfolder, type}, served by ComfyUI's /view.
//
// This file adds one DOM widget to the node: a button per word, an image picker when the batch
// has several images, a threshold slider, and a canvas that shows the chosen word's map over
// the chosen image (above the threshold: heat colours with a white outline; below: dimmed).
//
// Persistence: the payload (file references only, a few hundred bytes) and the viewer's choices
// (word, image, threshold) live in node.properties.conceptlab_saliency, which the workflow JSON
// keeps, so the viewer comes back after a page reload and when a saved workflow is opened. The
// PNGs themselves stay on the server; ComfyUI empties its temp folder when it restarts, and
// the viewer then says so and asks for a new run.
//
// Only the extension API is used (registerExtension, beforeRegisterNodeDef, onExecuted,
// onConfigure, addDOMWidget). It works in both renderers of the front end (1.32 and newer): on the
// classic canvas the front end places the widget's element over the node (sized by getMinHeight /
// getHeight); with Nodes 2.0 (Comfy.VueNodes.Enabled) it mounts the same element inside the Vue
// node. Nothing is drawn from onDrawForeground, which Nodes 2.0 never calls.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "ConceptLabSaliencyMaps";
const PAYLOAD_KEY = "concept_lab_saliency";
const PROPERTY = "conceptlab_saliency";
const WIDGET_NAME = "conceptlab_saliency_viewer";
const MIN_HEIGHT = 240;
const STYLE_ID = "conceptlab-saliency-style";

const CSS = `
.cl-sal { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; overflow: hidden;
  font: 12px sans-serif; color: #e8e4f5; background: #1b1530; border-radius: 6px; padding: 6px; }
.cl-sal-row { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; }
.cl-sal-word { border: 1px solid #6a4fc4; background: #2b2150; color: #e8e4f5; border-radius: 10px;
  padding: 1px 8px; cursor: pointer; font: inherit; }
.cl-sal-word[aria-pressed="true"] { background: #6a4fc4; color: #fff; }
.cl-sal-row select { font: inherit; background: #2b2150; color: #e8e4f5; border: 1px solid #6a4fc4; }
.cl-sal-row input[type=range] { flex: 1; min-width: 60px; accent-color: #8d6ff0; }
.cl-sal-view { flex: 1; min-height: 0; display: flex; align-items: center; justify-content: center; }
.cl-sal-view canvas { max-width: 100%; max-height: 100%; width: auto; height: 100%;
  object-fit: contain; background: #000; }
.cl-sal-status { color: #b9b0d6; min-height: 1.2em; }
`;

// ---------------------------------------------------------------------------------------------
// state
// ---------------------------------------------------------------------------------------------
function validPayload(p) {
    return !!p && Array.isArray(p.words) && p.words.length > 0 && Array.isArray(p.images)
        && Array.isArray(p.maps) && p.maps.length === p.images.length;
}

function clamp01(x, fallback) {
    const v = Number(x);
    return Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : fallback;
}

// The persisted state, kept small: file references and the viewer's choices.
function normaliseState(saved) {
    if (!saved || !validPayload(saved.run)) return null;
    const run = saved.run;
    const word = run.words.includes(saved.word) ? saved.word : run.words[0];
    const image = Number.isInteger(saved.image) && saved.image >= 0 && saved.image < run.images.length
        ? saved.image : 0;
    return { run, word, image, threshold: clamp01(saved.threshold, clamp01(run.threshold, 0.5)) };
}

function viewUrl(ref) {
    const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "",
        type: ref.type ?? "temp" });
    const route = `/view?${q.toString()}`;
    return typeof api?.apiURL === "function" ? api.apiURL(route) : route;
}

const imageCache = new Map();   // url -> Promise<HTMLImageElement>

function loadImage(ref) {
    const url = viewUrl(ref);
    if (!imageCache.has(url)) {
        imageCache.set(url, new Promise((resolve, reject) => {
            const img = new Image();
            img.onload = () => resolve(img);
            img.onerror = () => {
                imageCache.delete(url);
                reject(new Error(`could not load ${ref.filename}`));
            };
            img.src = url;
        }));
        if (imageCache.size > 256) imageCache.delete(imageCache.keys().next().value);
    }
    return imageCache.get(url);
}

// ---------------------------------------------------------------------------------------------
// drawing
// ---------------------------------------------------------------------------------------------
// A compact "inferno"-like colour ramp: value 0..1 -> [r, g, b].
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function ramp(v) {
    const x = Math.min(0.9999, Math.max(0, v)) * (RAMP.length - 1);
    const i = Math.floor(x), f = x - i, a = RAMP[i], b = RAMP[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
}

// Pixel data per loaded image and size, so that dragging the slider only repaints.
const pixelCache = new WeakMap();   // HTMLImageElement -> {key, data}

function pixels(img, w, h) {
    const key = `${w}x${h}`;
    const hit = pixelCache.get(img);
    if (hit && hit.key === key) return hit.data;
    const data = readPixels(img, w, h);
    pixelCache.set(img, { key, data });
    return data;
}

function readPixels(img, w, h) {
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const ctx = c.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(img, 0, 0, w, h);
    return ctx.getImageData(0, 0, w, h).data;
}

// Paints `canvas` with the map over the image; returns the share of pixels >= threshold.
function paint(canvas, baseImg, mapImg, threshold) {
    const w = baseImg.naturalWidth || baseImg.width, h = baseImg.naturalHeight || baseImg.height;
    canvas.width = w;
    canvas.height = h;
    const base = pixels(baseImg, w, h);
    const map = pixels(mapImg, w, h);
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(w, h);
    const d = out.data;
    const t = threshold * 255;
    const inside = new Uint8Array(w * h);
    let count = 0;
    for (let p = 0; p < w * h; p++) {
        if (map[4 * p] >= t) {
            inside[p] = 1;
            count++;
        }
    }
    for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
            const p = y * w + x, o = 4 * p;
            if (inside[p]) {
                const edge = (x > 0 && !inside[p - 1]) || (x < w - 1 && !inside[p + 1])
                    || (y > 0 && !inside[p - w]) || (y < h - 1 && !inside[p + w]);
                if (edge) {
                    d[o] = d[o + 1] = d[o + 2] = 255;
                } else {
                    const c = ramp(map[o] / 255);
                    d[o] = 0.45 * base[o] + 0.55 * c[0];
                    d[o + 1] = 0.45 * base[o + 1] + 0.55 * c[1];
                    d[o + 2] = 0.45 * base[o + 2] + 0.55 * c[2];
                }
            } else {
                d[o] = 0.4 * base[o];
                d[o + 1] = 0.4 * base[o + 1];
                d[o + 2] = 0.4 * base[o + 2];
            }
            d[o + 3] = 255;
        }
    }
    ctx.putImageData(out, 0, 0);
    return count / (w * h);
}

// ---------------------------------------------------------------------------------------------
// the viewer widget
// ---------------------------------------------------------------------------------------------
function ensureStyle() {
    if (document.getElementById(STYLE_ID)) return;
    const style = document.createElement("style");
    style.id = STYLE_ID;
    style.textContent = CSS;
    document.head.append(style);
}

function el(tag, cls, attrs = {}) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
}

class SaliencyViewer {
    constructor(node) {
        this.node = node;
        this.state = null;
        this.drawn = 0;          // how many pictures were painted (read by tests)
        this.renderToken = 0;
        ensureStyle();
        const root = (this.root = el("div", "cl-sal", { "data-conceptlab": "saliency-viewer",
            "data-state": "empty" }));
        this.words = el("div", "cl-sal-row", { "data-role": "words" });
        const controls = el("div", "cl-sal-row");
        this.imageSelect = el("select", "", { "data-role": "image", title: "Image of the batch" });
        this.imageSelect.style.display = "none";
        const label = el("span");
        label.textContent = "threshold";
        this.slider = el("input", "", { type: "range", min: "0", max: "1", step: "0.01",
            "data-role": "threshold", title: "Pixels whose map value is at least this are shown " +
            "in colour, the rest dimmed (a view setting; the node's own threshold makes its masks)" });
        this.sliderValue = el("span", "", { "data-role": "threshold-value" });
        controls.append(this.imageSelect, label, this.slider, this.sliderValue);
        const view = el("div", "cl-sal-view");
        this.canvas = el("canvas", "", { "data-role": "view" });
        this.canvas.width = this.canvas.height = 1;
        view.append(this.canvas);
        this.status = el("div", "cl-sal-status", { "data-role": "status" });
        this.status.textContent = "Queue the workflow to see where each word lands.";
        root.append(this.words, controls, view, this.status);

        this.slider.addEventListener("input", () => this.choose({ threshold: Number(this.slider.value) }));
        this.imageSelect.addEventListener("change", () =>
            this.choose({ image: Number(this.imageSelect.value) }));
        // Keep pointer gestures on the controls from dragging the node around.
        for (const evt of ["pointerdown", "mousedown"]) {
            controls.addEventListener(evt, (e) => e.stopPropagation());
            this.words.addEventListener(evt, (e) => e.stopPropagation());
        }
    }

    // A new run (from onExecuted): keep the user's word / image / threshold where they still apply.
    setRun(run) {
        if (!validPayload(run)) return;
        const prev = this.state;
        this.apply(normaliseState({ run, word: prev?.word, image: prev?.image,
            threshold: prev ? prev.threshold : run.threshold }), true);
    }

    // A saved state (from the workflow's node properties).
    restore(saved) {
        const state = normaliseState(saved);
        if (state) this.apply(state, false);
    }

    choose(change) {
        if (!this.state) return;
        this.apply({ ...this.state, ...change }, true);
    }

    apply(state, changed) {
        if (!state) return;
        const rebuild = !this.state || this.state.run !== state.run;
        this.state = state;
        this.node.properties = this.node.properties || {};
        this.node.properties[PROPERTY] = { run: state.run, word: state.word, image: state.image,
            threshold: state.threshold };
        if (rebuild) this.buildControls();
        this.syncControls();
        this.render();
        if (changed) noteGraphChanged();
    }

    buildControls() {
        const { run } = this.state;
        this.words.replaceChildren(...run.words.map((word) => {
            const b = el("button", "cl-sal-word", { type: "button", "data-word": word });
            b.textContent = word;
            b.addEventListener("click", () => this.choose({ word }));
            return b;
        }));
        this.imageSelect.replaceChildren(...run.images.map((_, i) => {
            const o = el("option", "", { value: String(i) });
            o.textContent = `image ${i + 1} of ${run.images.length}`;
            return o;
        }));
        this.imageSelect.style.display = run.images.length > 1 ? "" : "none";
    }

    syncControls() {
        const { word, image, threshold } = this.state;
        for (const b of this.words.children) b.setAttribute("aria-pressed", String(b.dataset.word === word));
        this.imageSelect.value = String(image);
        this.slider.value = String(threshold);
        this.sliderValue.textContent = threshold.toFixed(2);
    }

    async render() {
        const token = ++this.renderToken;
        const { run, word, image, threshold } = this.state;
        const j = run.words.indexOf(word);
        this.root.dataset.state = "loading";
        try {
            const [baseImg, mapImg] = await Promise.all([loadImage(run.images[image]),
                loadImage(run.maps[image][j])]);
            if (token !== this.renderToken) return;
            const share = paint(this.canvas, baseImg, mapImg, threshold);
            this.drawn++;
            this.status.textContent = `${run.method ?? "saliency"} · "${word}": `
                + `${Math.round(share * 100)}% of the image at or above ${threshold.toFixed(2)}`;
            // Why this method ran (Saliency Capture's 'auto' rule), on hover.
            this.status.title = run.method_note ?? "";
            this.root.dataset.state = "ready";
        } catch (_) {
            if (token !== this.renderToken) return;
            this.status.textContent = "The pictures of this run are no longer on the server "
                + "(ComfyUI empties its temp folder when it restarts). Queue the workflow again.";
            this.root.dataset.state = "missing";
        }
        this.node.setDirtyCanvas?.(true, false);
    }
}

// Tell the front end that the graph changed (so the open workflow, including our node property,
// is persisted for a page reload and marked modified).
function noteGraphChanged() {
    try {
        app?.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
    } catch (_) {
        /* a front end without a change tracker */
    }
}

function attachViewer(node) {
    if (node.conceptLabSaliency) return node.conceptLabSaliency;
    const viewer = new SaliencyViewer(node);
    const widget = node.addDOMWidget(WIDGET_NAME, "conceptlab-saliency", viewer.root, {
        serialize: false,             // not a node input: keep it out of the prompt
        hideOnZoom: false,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => MIN_HEIGHT,
        getHeight: () => MIN_HEIGHT,
    });
    widget.serialize = false;         // and out of widgets_values
    widget.serializeValue = () => undefined;
    node.conceptLabSaliency = viewer;
    const [w, h] = node.size ?? [0, 0];
    if (typeof node.computeSize === "function" && typeof node.setSize === "function") {
        const min = node.computeSize();
        node.setSize([Math.max(w, min[0], 300), Math.max(h, min[1])]);
    }
    return viewer;
}

app.registerExtension({
    name: "ConceptLab.SaliencyViewer",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_CLASS) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated?.apply(this, arguments);
            try {
                attachViewer(this);
            } catch (err) {
                console.debug?.("Concept Lab: could not add the saliency viewer", err);
            }
            return r;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function (info) {
            const r = onConfigure?.apply(this, arguments);
            const saved = info?.properties?.[PROPERTY] ?? this.properties?.[PROPERTY];
            if (saved) attachViewer(this).restore(saved);
            return r;
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            const r = onExecuted?.apply(this, arguments);
            const list = output?.[PAYLOAD_KEY];
            const run = Array.isArray(list) ? list[list.length - 1] : list;
            if (run) attachViewer(this).setRun(run);
            return r;
        };
    },
});
