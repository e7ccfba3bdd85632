#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust tests, and the Python SDK tests against a
# real `crisp up`. Installs what it needs (a Python virtual environment in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if [ -n "${CI:-}" ]; then
  # A fresh checkout is built once: incremental state and pip's download cache would only
  # take disk space.
  export CARGO_INCREMENTAL=0 PIP_NO_CACHE_DIR=1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "llama.cpp server for the backend conformance tests (cached in ~/.cache/crisp)"
LLAMA_VENV="${CRISP_LLAMA_VENV:-$HOME/.cache/crisp/llama-venv}"
if ! "$LLAMA_VENV/bin/python" -c 'import llama_cpp.server, gguf' 2>/dev/null; then
  # Compiles llama.cpp the first time (a few minutes on 2 cores); reused afterwards.
  python3 -m venv "$LLAMA_VENV"
  "$LLAMA_VENV/bin/pip" install --quiet --disable-pip-version-check \
    'llama-cpp-python[server]==0.3.16' 'gguf==0.19.0' 'numpy<3'
fi
export CRISP_LLAMA_PYTHON="$LLAMA_VENV/bin/python"

step "S3-compatible store for the audit shipping tests (s3s-fs, installed once)"
if [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  # Pinned: newer releases need a newer rustc.
  cargo install s3s-fs@0.14.1 --features binary --locked
fi
export CRISP_S3S_FS="$HOME/.cargo/bin/s3s-fs"

step "cargo test"
cargo test --workspace --locked

step "Python SDK tests (openai) against crisp up; Grafana dashboard"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --locked --bin crisp
.venv/bin/python -m pytest -q tests/python

step "Backbone across network namespaces (real crisp serve nodes, delaying relays, a cut link)"
if ! command -v ip >/dev/null; then
  apt-get update -qq && apt-get install -y -qq iproute2
fi
cargo build --locked --bin crisp
.venv/bin/python -m pytest -q -s tests/netns

step "Deployment recipe: hadolint on deploy/Dockerfile; Helm chart rendered with Helm's engine, validated against Kubernetes schemas, and its pods run"
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt
.venv/bin/python -m pytest -q tests/deploy
