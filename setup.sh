#!/usr/bin/env bash
# Sets this project up on a fresh machine: graphviz's `dot` program (from the
# system's packages, where it is missing), a virtual environment in .venv, and
# the package with its dependencies.
#   ./setup.sh        what the tool needs
#   ./setup.sh test   that, and what the tests need (transformers, the reference)
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v dot >/dev/null 2>&1; then
  echo "setup: installing graphviz (the dot program draws the stage diagrams)"
  if command -v apt-get >/dev/null 2>&1; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get update -qq && $as_root apt-get install -y -qq graphviz >/dev/null
  elif command -v brew >/dev/null 2>&1; then
    brew install graphviz
  else
    echo "setup: please install graphviz (https://graphviz.org/download/) and run this again" >&2
    exit 1
  fi
fi

extras=""
[ "${1:-}" = "test" ] && extras="[test]"
python3 -m venv .venv
# torch 2.13.0 is the tested version; pip takes a CPU or CUDA build as your platform offers.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".${extras}"
# `python -m trace` from any folder reaches this project, not the standard library's trace module.
.venv/bin/python -c "import llama_trace; llama_trace.install_python_m_hook()"
echo "setup: done (.venv)"
