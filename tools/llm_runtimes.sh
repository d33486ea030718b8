#!/usr/bin/env bash
# The LLM deployment runtimes the tests generate tokens with (tests/test_llm_formats.py). Each pins its own
# onnxruntime/transformers, so each gets its own venv beside the project's .venv; an existing one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-genai/bin/python ]; then
  python3 -m venv .venv-genai
  .venv-genai/bin/pip install -q torch==2.13.0 onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx onnx-ir onnxscript transformers
fi
if [ ! -x .venv-optimum/bin/python ]; then
  python3 -m venv .venv-optimum
  .venv-optimum/bin/pip install -q torch==2.13.0 optimum-onnx==0.1.0 onnxruntime==1.32.0
fi
