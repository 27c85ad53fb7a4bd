#!/usr/bin/env bash
# The whole CUDA extension, built, linked and loaded on a machine without a GPU, against the GPU
# machine's exact torch (2.11.0+cu130): host files, launchers and kernels for sm_80 and sm_90a,
# with ptxas's register / spill report of the flags that ship. Fails on any compile, link or load
# error, or when an operator has no CUDA kernel registered.
#
#   bash .ci/cuda_build.sh [OUTDIR]      (default build-cuda-artifact)
#
# Leaves OUTDIR/_C.abi3.so (stripped; imports under Python 3.10+ beside that torch) and
# OUTDIR/torch_git_version, the GPU artifact that bench/gpu_suite.sh uses instead of building.
# Its own virtual environment (build-cuda-env): the CPU torch of the tests is left alone.
# Needs nvcc (CUDA 13.0) and about 1.3 GB of disk; downloads the 530 MB torch wheel once.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-build-cuda-artifact}")
ENV=$(realpath -m "${CSQ_CUDA_ENV:-build-cuda-env}")
TORCH_CUDA=${CSQ_CUDA_TORCH:-torch==2.11.0}   # the public index's 2.11.0 is 2.11.0+cu130
# The nvcc on the PATH may be a wrapper script, from which torch would guess a wrong CUDA_HOME.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; }

t0=$SECONDS
if [ ! -x "$ENV/bin/python" ]; then python3 -m venv "$ENV"; fi
PY="$ENV/bin/python"
# --no-deps: torch's CUDA runtime wheels (cuDNN, cuBLAS, NCCL: gigabytes) are not needed to
# build; stand-ins below let torch import without them.
"$PY" -m pip install -q --no-deps "$TORCH_CUDA"
"$PY" -m pip install -q typing_extensions sympy filelock networkx jinja2 fsspec numpy \
  "setuptools>=77" wheel ninja
"$PY" .ci/cuda_stand_ins.py "$ENV/stand-ins" >/dev/null
export LD_LIBRARY_PATH="$ENV/stand-ins:$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
echo "   environment ready in $((SECONDS - t0)) s"

t0=$SECONDS
rm -rf "$OUT" && mkdir -p "$OUT/lib" "$OUT/tmp"
CSQ_FORCE_CUDA=1 CSQ_PTXAS_VERBOSE=1 CSQ_STRIP=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"} \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext -b "$OUT/lib" -t "$OUT/tmp" > "$OUT/build.log" 2>&1 \
  || { tail -n 60 "$OUT/build.log"; echo "CUDA build failed"; exit 1; }
echo "   built in $((SECONDS - t0)) s"

echo "   ptxas (flags that ship): kernels with spills, then the register counts"
"$PY" .ci/ptxas_report.py "$OUT/build.log"

# Load it the way a user would: the package's Python files beside the built module, imported
# from that folder (not from the repository, whose csq_ext may hold a CPU build).
cp csq_ext/*.py "$OUT/lib/csq_ext/"
(cd "$OUT/lib" && "$PY" - <<'EOF'
import torch
import csq_ext
from csq_ext._ops import ops
info = ops.build_info()
print("  ", csq_ext.__file__, info)
assert "cuda" in info, info
for op in ("csq_chunked_fwd", "csq_chunked_bwd", "csq_decode_", "csq_direct_fwd", "csq_direct_bwd",
           "csq_state", "csq_state_bwd", "csq_pool_prefill_", "csq_pool_decode_"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csq_ext::{op}", key), (op, key)
print("   every operator has a CPU and a CUDA kernel")
EOF
)
cp "$OUT/lib/csq_ext/_C.abi3.so" "$OUT/_C.abi3.so"
"$PY" -c 'import torch; print(torch.version.git_version)' > "$OUT/torch_git_version"
rm -rf "$OUT/tmp"
echo "   artifact: $OUT/_C.abi3.so ($(du -h "$OUT/_C.abi3.so" | cut -f1)), for torch $(cat "$OUT/torch_git_version")"
