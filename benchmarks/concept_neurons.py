"""python -m benchmarks concept-neurons: work in progress."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the figures to this path")


def run(args) -> dict:
    raise SystemExit("not implemented yet")
