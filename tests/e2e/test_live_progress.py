"""End to end: what Extract, Seed Search and Seed Rank show while they run, read from a real
ComfyUI server's websocket as the front end reads it.

- Seed Search: after every iteration a preview of the candidate it drew (a JPEG for the node,
  the demo's square 64 px candidate scaled to the server's preview size) and the objective as
  progress text; Seed Rank: the best candidate so far and how many seeds are
  scored; Extract: the loss and the K/V weights shut, after every gradient.
- The bar stays exact: every value once, in order, ending at the total. ComfyUI 0.33 passes on
  every update that carries a preview and throttles the others (at most one per 100 ms, and 1 %),
  so Extract's bar there may skip values, never repeat or reverse them; 0.3.75 passes on all.
- Cancel stops a running search within a model call: pressed after the second iteration, the
  node stops before the bar moves again, in well under an iteration.

The client declares ``supports_preview_metadata`` (as the front end does), so previews arrive with
the id of the node they belong to.
"""
import asyncio
import io
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "workflows_v1" / "api"
TEXT, PREVIEW, PREVIEW_WITH_METADATA = 3, 1, 4           # ComfyUI's BinaryEventTypes


@dataclass
class Run:
    progress: list = field(default_factory=list)    # (node, value, max, time)
    texts: list = field(default_factory=list)       # (node, text)
    previews: list = field(default_factory=list)    # (node, (width, height))
    events: list = field(default_factory=list)      # ("progress" | "text" | "preview", node) in order
    end: str = ""                                    # execution_success / _error / _interrupted
    error: str = ""
    interrupted_after: float = 0.0                  # seconds from the cancel to the interruption
    iteration_seconds: float = 0.0                  # between the bar's first two values

    def of(self, node: str) -> dict:
        return {"values": [v for n, v, _, _ in self.progress if n == node],
                "totals": {m for n, _, m, _ in self.progress if n == node},
                "texts": [t for n, t in self.texts if n == node],
                "previews": [s for n, s in self.previews if n == node]}


def _decode(data: bytes, run: Run) -> None:
    from PIL import Image
    kind = struct.unpack(">I", data[:4])[0]
    body = data[4:]
    if kind == TEXT:
        n = struct.unpack(">I", body[:4])[0]
        node, text = body[4:4 + n].decode(), body[4 + n:].decode()
        run.texts.append((node, text))
        run.events.append(("text", node))
    elif kind == PREVIEW_WITH_METADATA:
        n = struct.unpack(">I", body[:4])[0]
        meta = json.loads(body[4:4 + n])
        with Image.open(io.BytesIO(body[4 + n:])) as im:
            size = im.size
        run.previews.append((meta["node_id"], size))
        run.events.append(("preview", meta["node_id"]))


async def _watch(url: str, prompt: dict, cancel_at: tuple | None = None, timeout: float = 600) -> Run:
    """Queue ``prompt`` over HTTP and read the websocket until it ends. ``cancel_at``: (node,
    value): press Cancel (/interrupt) once that node's bar reaches that value."""
    import aiohttp
    run, client = Run(), uuid.uuid4().hex
    cancelled_at = None
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws", 1) + f"/ws?clientId={client}") as ws:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            async with http.post(url + "/prompt", json={"prompt": prompt, "client_id": client}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            deadline = time.time() + timeout
            while not run.end:
                msg = await ws.receive(timeout=max(1.0, deadline - time.time()))
                if msg.type == aiohttp.WSMsgType.BINARY:
                    _decode(msg.data, run)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"websocket closed: {msg}")
                m = json.loads(msg.data)
                data = m.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if m["type"] == "progress":
                    run.progress.append((data["node"], data["value"], data["max"], time.perf_counter()))
                    run.events.append(("progress", data["node"]))
                    if cancel_at and cancelled_at is None and (data["node"], data["value"]) == cancel_at:
                        first, second = [t for n, v, _, t in run.progress if n == cancel_at[0]][:2]
                        run.iteration_seconds = second - first
                        async with http.post(url + "/interrupt", json={}) as r:
                            assert r.status == 200
                        cancelled_at = time.perf_counter()
                elif m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    run.end = m["type"]
                    run.error = data.get("exception_message", "")
                    if cancelled_at is not None:
                        run.interrupted_after = time.perf_counter() - cancelled_at
                elif m["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    run.end = run.end or "execution_success"
    return run


def _prompt(name: str, **changes) -> tuple:
    """A saved example prompt, with ``changes`` {class_type: {input: value}}; and the id of each
    changed node."""
    prompt = json.loads((FIXTURES / name).read_text())
    ids = {}
    for node_id, node in prompt.items():
        if node["class_type"] in changes:
            node["inputs"].update(changes[node["class_type"]])
            ids[node["class_type"]] = node_id
    return prompt, ids


def _throttled() -> bool:
    """Whether this ComfyUI throttles progress updates without a preview (0.33)."""
    return "PROGRESS_THROTTLE_MIN_INTERVAL" in (cr.comfy_root() / "comfy" / "utils.py").read_text()


def _exact_bar(values: list, total: int, every: bool = True) -> None:
    assert values and values[-1] == total, values
    assert all(b > a for a, b in zip(values, values[1:])), f"a value repeated or went back: {values}"
    if every:
        assert values == list(range(1, total + 1)), values


def test_seed_search_shows_each_candidate_and_its_objective(server):
    prompt, ids = _prompt("seed_select_then_custom_advanced.json",
                          ConceptLabSeedSearch={"iterations": 4, "search_steps": 2},
                          BasicScheduler={"steps": 2})
    run = asyncio.run(_watch(server.url, prompt))
    assert run.end == "execution_success", (run.end, run.error)
    seen = run.of(ids["ConceptLabSeedSearch"])
    _exact_bar(seen["values"], 4)                            # a preview with every update: none dropped
    assert seen["totals"] == {4}
    assert len(seen["previews"]) == 4 and all(w == h >= 64 for w, h in seen["previews"]), seen["previews"]
    assert len(seen["texts"]) == 4 and all(t.startswith(f"iteration {i + 1}/4: objective ")
                                           for i, t in enumerate(seen["texts"])), seen["texts"]
    # each iteration's text comes before its bar update
    node = ids["ConceptLabSeedSearch"]
    order = [kind for kind, n in run.events if n == node and kind != "preview"]
    assert order == ["text", "progress"] * 4, order


def test_seed_rank_shows_the_best_candidate_so_far(server):
    prompt, ids = _prompt("seed_rank_then_ksampler.json",
                          ConceptLabSeedRank={"candidates": 6, "batch_size": 2}, KSampler={"steps": 2})
    run = asyncio.run(_watch(server.url, prompt))
    assert run.end == "execution_success", (run.end, run.error)
    seen = run.of(ids["ConceptLabSeedRank"])
    _exact_bar(seen["values"], 3)                            # 6 seeds, 2 per model call
    assert len(seen["previews"]) == 3 and all(w == h >= 64 for w, h in seen["previews"]), seen["previews"]
    assert [t.split(";")[0] for t in seen["texts"]] == ["scored 2/6 seeds", "scored 4/6 seeds", "scored 6/6 seeds"]
    assert all("best so far: seed " in t for t in seen["texts"]), seen["texts"]


def test_extract_shows_the_loss_and_the_weights_shut(server):
    prompt, ids = _prompt("concept_extract_then_save.json",
                          ConceptLabConceptNeuronsExtract={"iterations": 3, "prior_images": 0, "noise_draws": 1})
    run = asyncio.run(_watch(server.url, prompt))
    assert run.end == "execution_success", (run.end, run.error)
    seen = run.of(ids["ConceptLabConceptNeuronsExtract"])
    _exact_bar(seen["values"], 5, every=not _throttled())    # encode, prior images (none), 3 gradients
    texts = seen["texts"]
    assert [t.split(":")[0] for t in texts] == ["gradient 1/3", "gradient 2/3", "gradient 3/3"], texts
    shut = [int(t.split("; ")[1].split(" of ")[0].replace(",", "")) for t in texts]
    assert shut[0] == 0 and shut == sorted(shut) and shut[-1] > 0, texts     # shut in rounds
    assert all("K/V weights shut" in t and "(start " in t for t in texts), texts


def test_cancel_stops_the_search_within_a_model_call(server):
    prompt, ids = _prompt("seed_select_then_custom_advanced.json",
                          ConceptLabSeedSearch={"iterations": 50, "search_steps": 6})
    node = ids["ConceptLabSeedSearch"]
    run = asyncio.run(_watch(server.url, prompt, cancel_at=(node, 2)))
    assert run.end == "execution_interrupted", (run.end, run.error)
    assert run.of(node)["values"] == [1, 2], "the bar moved after Cancel"
    # an iteration makes about 20 model calls here (6 steps forward, then each recomputed with its
    # backward pass); stopping at the next call takes a fraction of it, waiting for the iteration's
    # end would take it all
    assert run.interrupted_after < run.iteration_seconds / 2, (run.interrupted_after, run.iteration_seconds)
