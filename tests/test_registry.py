"""The pack's Comfy Registry metadata, read as the registry's own tools read it.

- ``pyproject.toml`` is parsed by the running ComfyUI's ``comfy_config.config_parser`` (ComfyUI's copy
  of comfy-cli's parser, kept in sync with it): the node id, version, license file, URLs (the
  issues link), operating systems, accelerators and ``requires-comfyui`` must come out as meant,
  and the running ComfyUI must satisfy ``requires-comfyui``.
- What ``comfy node validate`` checks before publishing: the config parses with a version, and
  ``ruff check . --select S102,S307,E702`` (exec, eval, several statements on one line) finds
  nothing in the pack's Python. comfy-cli only warns about these today and says they will become
  errors; here they fail.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)


def _comfy_config_parser():
    """ComfyUI's comfy_config.config_parser, imported from the running ComfyUI's folder."""
    root = str(cr.comfy_root())
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module("comfy_config.config_parser")


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_pyproject_reads_as_the_registry_reads_it():
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = _comfy_config_parser().extract_node_configuration(str(ROOT))
    project, comfy = config.project, config.tool_comfy
    assert project.name == "conceptlab" and project.version == raw["project"]["version"], project
    assert project.license.file == "LICENSE", project.license
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Permission is hereby granted, free of charge" in licence
    assert "License: MIT." in (ROOT / "README.md").read_text()
    repo = project.urls.repository
    assert repo.startswith("https://github.com/"), project.urls
    assert project.urls.issues == raw["project"]["urls"]["Bug Tracker"] == f"{repo}/issues", project.urls
    assert project.supported_os == ["OS Independent"], project.supported_os
    # NVIDIA and the CPU are declared; the parsers know no CPU value, so they store no accelerator
    # list, which the Manager's conflict check reads as "every accelerator" (none is flagged).
    assert {"Environment :: GPU :: NVIDIA CUDA", "Environment :: CPU"} <= set(raw["project"]["classifiers"])
    assert project.supported_accelerators == [], project.supported_accelerators
    assert project.supported_comfyui_version == ">=0.3.75", project.supported_comfyui_version
    assert _version(cr.comfy_version()) >= _version(project.supported_comfyui_version), cr.comfy_version()
    assert comfy.publisher_id == "conceptlab" and comfy.display_name == "Concept Lab", comfy
    assert comfy.icon.endswith("/web/icon.svg") and (ROOT / "web" / "icon.svg").is_file(), comfy.icon


def test_comfy_node_validate_security_checks_find_nothing():
    """``comfy node validate`` runs ``ruff check . -q --select S102,S307,E702`` in the pack folder."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is missing from this environment: it is in requirements-dev.txt "
                    "(bash scripts/lab.sh setup installs it)")
    cmd = [sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702", "--no-cache",
           "--output-format", "concise"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NO_COLOR="1"))
    assert out.returncode == 0 and not out.stdout.strip(), (
        f"{' '.join(cmd[2:])} in {ROOT} found what the Comfy Registry's validation warns about "
        f"(and will refuse):\n{out.stdout}{out.stderr}")
