"""The progress line: subjects done, running and failed, and the time left.

On a terminal it redraws one line; otherwise (a log file, CI) it prints a line whenever a count
changes, and at most every 30 seconds otherwise. The time left is the subjects still to do
divided by this run's rate (subjects finished per second, from its first subject's start to
its last subject's end).
"""
from __future__ import annotations

import sys
import time


def eta_text(seconds) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Rate:
    """Subjects per second in this run, and the time left for ``remaining`` of them."""

    def __init__(self):
        self.t0 = self.t_last = None
        self.finished = 0

    def started(self):
        if self.t0 is None:
            self.t0 = time.time()

    def one_finished(self):
        self.finished += 1
        self.t_last = time.time()

    @property
    def seconds(self) -> float | None:
        """From the first subject's start to the last one's end."""
        return None if self.t_last is None else self.t_last - self.t0

    @property
    def rate(self) -> float | None:
        if self.t0 is None or not self.finished:
            return None
        return self.finished / max(self.t_last - self.t0, 1e-6)

    def eta(self, remaining: int) -> float | None:
        r = self.rate
        return None if r is None else remaining / r


class ProgressLine:
    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.width = total, width
        self.last_line, self.last_key, self.last_time = "", None, 0.0

    def line(self, counts: dict, eta, servers_up: int, servers: int) -> str:
        done, failed, running = counts.get("done", 0), counts.get("failed", 0), counts.get("running", 0)
        total = max(self.total, 1)
        full = int(self.width * (done + failed) / total)
        bar = "#" * full + "-" * (self.width - full)
        return (f"[catalogue] [{bar}] {done + failed}/{self.total}  done {done} · running {running} · "
                f"failed {failed} · pending {counts.get('pending', 0)} · servers {servers_up}/{servers} · "
                f"ETA {eta_text(eta)}")

    def update(self, counts: dict, eta, servers_up: int, servers: int, force: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line(counts, eta, servers_up, servers)
        key = (counts.get("done"), counts.get("failed"), counts.get("running"), servers_up)
        now = time.time()
        if self.tty:
            if text != self.last_line or force:
                self.stream.write("\r" + text.ljust(len(self.last_line)))
                self.stream.flush()
        elif force or key != self.last_key or now - self.last_time > 30:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_time = now
        self.last_line, self.last_key = text, key

    def message(self, text: str) -> None:
        """A line above the bar (a lost server, a failed subject)."""
        if not self.enabled:
            return
        if self.tty and self.last_line:
            self.stream.write("\r" + " " * len(self.last_line) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self.last_line:
            self.stream.write(self.last_line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()
