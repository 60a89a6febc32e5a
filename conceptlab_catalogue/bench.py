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
    """Cores busy on the whole machine, and CPU seconds of this process's ComfyUI descendants
    (the servers the job starts), over the ``with`` block."""

    def __init__(self, every: float = 0.5):
        self.every, self.servers = every, {}

    @staticmethod
    def _stat() -> tuple:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)

    def _sample(self):
        import psutil
        for p in psutil.Process().children(recursive=True):
            try:
                if any(a.endswith("main.py") for a in p.cmdline()):
                    t = p.cpu_times()
                    self.servers[p.pid] = t.user + t.system
            except psutil.Error:
                pass

    def _loop(self):
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        import threading
        self.t0, (self.busy0, self.total0) = time.time(), self._stat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        busy, total = self._stat()
        wall = time.time() - self.t0
        ncpu = os.cpu_count() or 1
        self.machine_cores = ncpu * (busy - self.busy0) / max(total - self.total0, 1)
        self.server_cores = sum(self.servers.values()) / max(wall, 1e-6)


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
        results.append({"phase": label, "servers": servers, "threads_per_server": threads,
                        "subjects": s.finished_here, "work_seconds": round(s.work_seconds, 2),
                        "subjects_per_hour": round(3600 * s.rate, 1), "wall_seconds": round(time.time() - t0, 1),
                        "machine_busy_cores": round(cpu.machine_cores, 2),
                        "comfyui_cores": round(cpu.server_cores, 2),
                        "other_programs_cores": round(max(cpu.machine_cores - cpu.server_cores, 0.0), 2)})
        if progress:
            print(f"[bench] {label}: {n_subjects} subjects in {s.work_seconds:.1f} s = {3600 * s.rate:.0f}/hour "
                  f"(machine {cpu.machine_cores:.2f} cores busy, its ComfyUI servers {cpu.server_cores:.2f})")
    one, two = results[0]["subjects_per_hour"], results[1]["subjects_per_hour"]
    import ray
    return {"command": f"bash scripts/lab.sh catalogue bench --subjects {n_subjects}",
            "comfyui": str(demo.comfyui_path()), "ray": ray.__version__, "cpus": os.cpu_count(),
            "machine": platform.platform(), "phases": results, "ratio_two_over_one": round(two / one, 3),
            "ratio_two_over_one_server_two_threads": round(two / results[2]["subjects_per_hour"], 3)
            if len(results) > 2 else None, "settings": demo.QUICK}


def main(a) -> int:
    folder = Path(a.folder or tempfile.mkdtemp(prefix="catalogue-bench-"))
    out = measure(folder, a.subjects)
    print(json.dumps({k: out[k] for k in ("phases", "ratio_two_over_one", "ratio_two_over_one_server_two_threads")},
                     indent=1))
    print(f"[bench] two servers / one server: {out['ratio_two_over_one']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
