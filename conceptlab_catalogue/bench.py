"""Throughput of a catalogue job with one ComfyUI server and with two, measured in one run.

``bash scripts/lab.sh catalogue bench --subjects 16`` writes a digits-world catalogue (no bad
subjects) and runs it three times, each time on fresh CPU servers the job starts, from the same
photos and settings:

1. one server, one torch thread;
2. two servers, one torch thread each (the fair split of a 2-core machine: a server per core,
   as a GPU machine has a server per GPU);
3. one server with two torch threads (what one server gets from the whole machine).

Throughput is subjects per second from the first subject's start to the last one's end (server
start-up excluded: a long job pays it once). The figure is the ratio 2 / 1.

Other programs on the machine take cores from the servers, so each phase also records what the
whole machine's CPUs did (``/proc/stat``) and what the phase's ComfyUI servers used (their CPU
time): two servers can only be twice as fast as one when two cores are free for them.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from . import demo
from .job import run

class CpuMonitor:
    """Samples, every ``every`` seconds during the ``with`` block, the whole machine's busy CPU
    time (``/proc/stat``) and the CPU time of this process's ComfyUI descendants (the servers the
    job starts); :meth:`cores` gives both as average cores over a time window."""

    def __init__(self, every: float = 0.25):
        self.every, self.samples, self._servers = every, [], {}

    def _sample(self) -> None:
        import psutil
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy, total = sum(v) - v[3] - v[4], sum(v)
        for p in psutil.Process().children(recursive=True):
            try:
                if any(a.endswith("main.py") for a in p.cmdline()):
                    t = p.cpu_times()
                    self._servers[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self.samples.append((time.time(), busy, total, sum(self._servers.values())))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        import threading
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def cores(self, t0: float, t1: float) -> tuple:
        """(machine, servers): average busy cores in [t0, t1] (nearest samples)."""
        a = min(self.samples, key=lambda x: abs(x[0] - t0))
        b = min(self.samples, key=lambda x: abs(x[0] - t1))
        wall = max(b[0] - a[0], 1e-6)
        machine = (os.cpu_count() or 1) * (b[1] - a[1]) / max(b[2] - a[2], 1)
        return machine, (b[3] - a[3]) / wall


PHASES = (("one server, 1 thread", 1, 1), ("two servers, 1 thread each", 2, 1), ("one server, 2 threads", 1, 2))


def measure(folder: Path, n_subjects: int, phases=PHASES, progress: bool = True) -> dict:
    folder = Path(folder)
    demo.write_digits_catalogue(folder / "subjects", n_subjects)
    results = []
    for i, (label, servers, threads) in enumerate(phases, 1):
        work = folder / f"phase{i}"
        job = demo.demo_job(work, demo.local_servers(work / "servers", servers, threads), name="bench")
        job["subjects"] = str(folder / "subjects")
        t0 = time.time()
        with CpuMonitor() as cpu:
            s = run(job, progress=progress)
        if s.counts["done"] != n_subjects:
            raise RuntimeError(f"phase '{label}': {s.counts} (see {s.report})")
        machine, ours = cpu.cores(*s.work_window)
        results.append({"phase": label, "servers": servers, "threads_per_server": threads,
                        "subjects": s.finished_here, "work_seconds": round(s.work_seconds, 2),
                        "subjects_per_hour": round(3600 * s.rate, 1), "wall_seconds": round(time.time() - t0, 1),
                        "machine_busy_cores": round(machine, 2), "comfyui_cores": round(ours, 2),
                        "other_programs_cores": round(max(machine - ours, 0.0), 2),
                        "subjects_per_comfyui_core_hour": round(3600 * s.rate / max(ours, 1e-6), 1)})
        if progress:
            print(f"[bench] {label}: {n_subjects} subjects in {s.work_seconds:.1f} s = {3600 * s.rate:.0f}/hour; "
                  f"its ComfyUI servers used {ours:.2f} cores, the machine {machine:.2f} of {os.cpu_count()}")
    one, two = results[0], results[1]
    import ray
    return {"command": f"bash scripts/lab.sh catalogue bench --subjects {n_subjects}",
            "comfyui": str(demo.comfyui_path()), "ray": ray.__version__, "cpus": os.cpu_count(),
            "machine": platform.platform(), "phases": results,
            "ratio_two_over_one": round(two["subjects_per_hour"] / one["subjects_per_hour"], 3),
            # the same per core the servers actually got: 1.0 = two servers lose nothing to each other
            "per_core_two_over_one": round(two["subjects_per_comfyui_core_hour"]
                                           / one["subjects_per_comfyui_core_hour"], 3),
            "ratio_two_over_one_server_two_threads": round(two["subjects_per_hour"] / results[2]["subjects_per_hour"], 3)
            if len(results) > 2 else None, "settings": demo.QUICK}


def main(a) -> int:
    folder = Path(a.folder or tempfile.mkdtemp(prefix="catalogue-bench-"))
    out = measure(folder, a.subjects)
    keys = ("phases", "ratio_two_over_one", "per_core_two_over_one", "ratio_two_over_one_server_two_threads")
    print(json.dumps({k: out[k] for k in keys}, indent=1))
    print(f"[bench] two servers / one server: {out['ratio_two_over_one']:.2f}x "
          f"({out['per_core_two_over_one']:.2f}x per core the servers got)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
