"""Command line: ``python -m conceptlab_catalogue <command>`` (from the pack's folder), or
``bash scripts/lab.sh catalogue <command>`` in a developer checkout.

  run JOB.toml [--address RAY] [--server URL ...] [--retry-failed] [--redo-changed]
                       run the catalogue, or resume it where it stopped
  status JOB.toml      the ledger's counts and every subject's state (no Ray, no server)
  report JOB.toml      write the HTML report again from the ledger
  stop JOB.toml        stop the ComfyUI servers a killed run of this job left running
  demo [--subjects N] [--servers N] [--folder DIR]
                       a digits-world catalogue on local CPU servers (developer checkout)
  bench [--subjects N] [--json PATH]
                       throughput with one server and with two, in one run (developer checkout)

Exit codes of run: 0 every subject done; 3 finished, some subjects failed; 1 stopped before the
end (Ctrl-C, no server left); 2 the job file or catalogue is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_run(a) -> int:
    from .job import run
    summary = run(a.job, address=a.address, servers=a.server or None, retry_failed=a.retry_failed,
                  redo_changed=a.redo_changed, progress=not a.quiet)
    print(summary)
    return summary.exit_code


def _cmd_status(a) -> int:
    from .config import load_config
    from .ledger import Ledger
    cfg = load_config(a.job)
    path = cfg.output / "ledger.sqlite"
    if not path.is_file():
        print(f"[catalogue] {cfg.name}: not started yet (no ledger at {path})")
        return 0
    led = Ledger(path)
    c = led.counts()
    print(f"[catalogue] {cfg.name}: {c['done']} done, {c['running']} running, {c['failed']} failed, "
          f"{c['pending']} pending" + (f", {c['stale']} done with changed inputs" if c["stale"] else ""))
    for r in led.subjects():
        res = r["result"] or {}
        note = "flagged" if res.get("flagged") else ""
        if r["state"] == "failed":
            note = (r["error"] or "").splitlines()[0][:120]
        print(f"  {r['state']:8} {r['name']:30} attempts {r['attempts']}  {r['server'] or ''}  {note}")
    led.close()
    return 0


def _cmd_report(a) -> int:
    from . import report
    from .config import load_config, load_subjects
    from .job import write_results_csv
    from .ledger import Ledger
    cfg = load_config(a.job)
    led = Ledger(cfg.output / "ledger.sqlite")
    path = report.write(cfg, led, load_subjects(cfg), running=False, servers=[])
    write_results_csv(cfg, led)
    print(path)
    return 0


def _cmd_stop(a) -> int:
    import os
    import signal
    from .config import load_config
    from .ledger import Ledger
    cfg = load_config(a.job)
    led = Ledger(cfg.output / "ledger.sqlite")
    rows = led.db.execute("SELECT * FROM servers WHERE state='up'").fetchall()
    for r in rows:
        try:
            cmd = Path(f"/proc/{r['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        if "main.py" in cmd and f"--port {r['url'].rsplit(':', 1)[-1]}" in cmd:
            os.kill(r["pid"], signal.SIGTERM)
            print(f"[catalogue] stopped the server {r['url']} (pid {r['pid']})")
        led.set_server(r["label"], r["url"], r["pid"], r["node_id"], "stopped")
    if not rows:
        print("[catalogue] no server of this job is recorded as running")
    return 0


def _cmd_demo(a) -> int:
    import tempfile
    from . import demo
    from .job import run
    folder = Path(a.folder or tempfile.mkdtemp(prefix="catalogue-demo-"))
    if not (folder / "subjects").is_dir():
        demo.write_digits_catalogue(folder / "subjects", a.subjects, bad=a.bad)
    job = demo.demo_job(folder, demo.local_servers(folder / "servers", a.servers))
    summary = run(job, progress=not a.quiet)
    print(summary)
    return summary.exit_code


def _cmd_bench(a) -> int:
    from .bench import main
    return main(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conceptlab_catalogue",
                                description="Concept Lab catalogue jobs: many subjects on many ComfyUI servers, on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume a catalogue job")
    r.add_argument("job", help="the job file (.toml or .json)")
    r.add_argument("--address", help="a Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: a local Ray)")
    r.add_argument("--server", action="append", help="a ComfyUI URL, instead of the job file's servers (repeat)")
    r.add_argument("--retry-failed", action="store_true", help="run failed subjects again")
    r.add_argument("--redo-changed", action="store_true", help="redo done subjects whose photos or settings changed")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.set_defaults(fn=_cmd_run)
    for name, fn, text in (("status", _cmd_status, "show the ledger"), ("report", _cmd_report, "write the report again"),
                           ("stop", _cmd_stop, "stop servers a killed run left running")):
        s = sub.add_parser(name, help=text)
        s.add_argument("job")
        s.set_defaults(fn=fn)
    d = sub.add_parser("demo", help="a digits-world catalogue on local CPU servers")
    d.add_argument("--subjects", type=int, default=12)
    d.add_argument("--servers", type=int, default=2)
    d.add_argument("--folder")
    d.add_argument("--bad", action="store_true", help="add three subjects with bad photos")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    b = sub.add_parser("bench", help="throughput with one server and with two")
    b.add_argument("--subjects", type=int, default=16)
    b.add_argument("--json", help="write the figures here")
    b.add_argument("--folder")
    b.set_defaults(fn=_cmd_bench)
    a = p.parse_args(argv)
    from .config import ConfigError
    from .job import JobError
    try:
        return a.fn(a)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except JobError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
