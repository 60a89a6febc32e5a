"""The job's HTML report, ``report.html`` in the output folder.

It is rewritten (atomically) whenever a subject changes state, so it can be opened while the job
runs; until the job ends it reloads itself every few seconds. One row per subject: its state,
photos, concept file, each scene's image with the word's mask, the check's readings and flags,
and for a failed subject the error.
"""
from __future__ import annotations

import html
import os
import time
from pathlib import Path

from .files import write_atomic

STATE_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "running": "#1565c0", "pending": "#757575"}


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _rel(path: str | None, out: Path) -> str:
    if not path:
        return ""
    try:
        return os.path.relpath(path, out)
    except ValueError:
        return str(path)


def _fmt_seconds(s) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def render(cfg, ledger, subjects: list, running: bool, servers: list, progress: dict | None = None,
           stats: dict | None = None) -> str:
    out = cfg.output
    by_name = {s.name: s for s in subjects}
    counts = ledger.counts()
    stats = stats or {}
    rows = []
    for rec in ledger.subjects():
        s = by_name.get(rec["name"])
        rows.append(_row(rec, s, out, (progress or {}).get(rec["name"])))
    total = sum(counts[k] for k in ("pending", "running", "done", "failed"))
    refresh = '<meta http-equiv="refresh" content="5">' if running else ""
    flagged = sum(1 for r in ledger.subjects("done") if (r["result"] or {}).get("flagged"))
    if not servers:    # written from the ledger alone: the servers its subjects ran on
        seen = {}
        for r in ledger.subjects():
            if r["server"]:
                seen.setdefault(r["server"], 0)
                seen[r["server"]] += r["state"] == "done"
        servers = [{"label": u, "url": u, "state": "", "done": n} for u, n in seen.items()]
    server_rows = "".join(
        f"<tr><td>{_e(sv.get('label'))}</td><td>{_e(sv.get('url') or '')}</td><td>{_e(sv.get('state'))}</td>"
        f"<td>{_e(sv.get('comfyui') or '')}</td><td>{sv.get('done', 0)}</td><td>{_e(sv.get('note') or '')}</td></tr>"
        for sv in servers)
    head = (f"<b>{counts['done']}</b> done ({flagged} with flagged images) · <b>{counts['running']}</b> running · "
            f"<b>{counts['failed']}</b> failed · <b>{counts['pending']}</b> pending · {total} subjects")
    if counts.get("stale"):
        head += f" · {counts['stale']} done with changed inputs (run with --redo-changed to redo them)"
    extra = []
    if stats.get("rate"):
        extra.append(f"{3600 * stats['rate']:.1f} subjects per hour in this run")
    if stats.get("eta") is not None and running:
        extra.append(f"about {_fmt_seconds(stats['eta'])} left")
    state = "running" if running else "finished"
    attention = [r for r in ledger.subjects() if r["state"] == "failed" or (r["result"] or {}).get("flagged")]
    if attention:
        links = ", ".join(f"<a href='#{_e(r['name'])}'>{_e(r['name'])}</a> ({r['state'] if r['state'] == 'failed' else 'flagged'})"
                          for r in attention)
        head += f"<br>Needs a look: {links}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{refresh}<title>Catalogue {_e(cfg.name)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 6px;vertical-align:top}} th{{background:#f4f4f4;text-align:left}}
img{{image-rendering:pixelated;border:1px solid #ccc}} .flag{{color:#c62828}} .err{{color:#c62828;white-space:pre-wrap;max-width:40em}}
.state{{font-weight:bold}} .small{{font-size:12px;color:#555}} .scene{{display:inline-block;margin:0 8px 6px 0}}
</style></head><body>
<h1>Catalogue “{_e(cfg.name)}”</h1>
<p>{head}</p>
<p class="small">Job {state}; updated {time.strftime('%Y-%m-%d %H:%M:%S')}. {' · '.join(extra)}
{'This page reloads itself every 5 seconds while the job runs.' if running else ''}</p>
<h2>Servers</h2>
<table><tr><th>server</th><th>URL</th><th>state</th><th>ComfyUI</th><th>subjects done</th><th></th></tr>{server_rows}</table>
<h2>Subjects</h2>
<table><tr><th>subject</th><th>state</th><th>photos</th><th>concept file</th><th>images, masks and checks</th><th>run</th></tr>
{''.join(rows)}
</table></body></html>
"""


def _row(rec: dict, s, out: Path, live: dict | None) -> str:
    state = rec["state"]
    colour = STATE_COLOURS.get(state, "#000")
    name = f"<b>{_e(rec['name'])}</b>"
    if s is not None:
        name += f"<br><span class='small'>{_e(s.class_prompt)}</span>"
    photos = ""
    if s is not None:
        photos = f"{len(s.photos)} photo(s)<br>" + "".join(
            f"<img src='{_e(_rel(str(p), out))}' width=48 height=48 alt='{_e(Path(p).name)}'> " for p in s.photos[:10])
    res = rec.get("result") or {}
    concept = res.get("concept") or {}
    ccell = ""
    if concept.get("path"):
        ccell = (f"<a href='{_e(_rel(concept['path'], out))}'>{_e(Path(concept['path']).name)}</a> "
                 f"({concept.get('bytes', 0)} bytes)<br><span class='small'>sha256 {concept.get('sha256', '')[:16]}…<br>"
                 f"indices {concept.get('indices_sha256', '')[:16]}…</span>")
    elif concept.get("where"):
        ccell = f"on the server: {_e(concept['where'])}"
    if concept.get("info"):
        first, _, rest = concept["info"].partition("\n")
        ccell += (f"<details class='small'><summary>{_e(first)}</summary>{_e(rest).replace(chr(10), '<br>')}"
                  "</details>")
    scenes = []
    for chk in res.get("checks", []):
        img = next((o for o in res.get("outputs", []) if o["role"] == "image" and o["scene"] == chk["scene"]), None)
        msk = next((o for o in res.get("outputs", []) if o["role"] == "mask" and o["scene"] == chk["scene"]), None)
        pics = "".join(f"<img src='{_e(_rel(o['path'], out))}' width=96 height=96 title='{_e(o['role'])}'> "
                       for o in (img, msk) if o)
        readings = ", ".join(f"{k} {v}" for k, v in chk.get("readings", {}).items())
        flags = "".join(f"<div class='flag'>⚑ {_e(f)}</div>" for f in chk.get("flags", []))
        scenes.append(f"<div class='scene'>{pics}<br><span class='small'>scene {chk['scene']}: {_e(chk.get('prompt', ''))}"
                      f"<br>{_e(readings)}</span>{flags or '<div class=small>✓ check passed</div>'}</div>")
    if state == "failed":
        scenes.append(f"<div class='err'>{_e(rec.get('error') or '')}</div>")
    if state == "running" and live:
        bar = f"{live.get('node', '')} {live.get('value', 0)}/{live.get('max', 0)}" if live.get("max") else live.get("node", "")
        scenes.append(f"<span class='small'>on {_e(rec.get('server') or '')}: {_e(bar)}</span>")
    run = f"attempts {rec['attempts']}"
    if rec.get("server"):
        run += f"<br>{_e(rec['server'])}"
    if rec.get("seconds"):
        run += f"<br>{rec['seconds']:.1f} s"
    if res.get("resumed"):
        run += "<br>rejoined after a restart"
    if rec.get("stale"):
        run += "<br><span class='flag'>inputs changed since</span>"
    return (f"<tr id='{_e(rec['name'])}'><td>{name}</td><td class='state' style='color:{colour}'>{state}</td>"
            f"<td>{photos}</td><td>{ccell}</td><td>{''.join(scenes)}</td><td class='small'>{run}</td></tr>")


def write(cfg, ledger, subjects, running: bool, servers: list, progress=None, stats=None) -> Path:
    path = cfg.output / "report.html"
    write_atomic(path, render(cfg, ledger, subjects, running, servers, progress, stats).encode())
    return path
