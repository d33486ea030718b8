#!/usr/bin/env bash
# The wheel is the product: build it, install it (not editable) in a fresh venv, and prune a small model with
# --verify from that install, outside the source tree so nothing is imported from the checkout.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --no-deps -q -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$(ls "$work"/dist/graphprune-*.whl)[cpu]"
cd "$work"
"$work/venv/bin/python" "$repo/tools/wheel_smoke_model.py" "$work/smoke.onnx"
"$work/venv/bin/graphprune" "$work/smoke.onnx" --target-flops 0.5 --round-to 1 --verify -o "$work/smoke.pruned.onnx"
"$work/venv/bin/graphprune" analyze "$work/smoke.pruned.onnx" > /dev/null
"$work/venv/bin/python" -c "import graphprune, graphprune.oprules, graphprune.passes; assert 'site-packages' in graphprune.__file__, graphprune.__file__"
echo "wheel check: $(ls "$work"/dist) installs and prunes with --verify"
