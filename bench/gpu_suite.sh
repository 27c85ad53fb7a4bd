#!/usr/bin/env bash
# csq_ext on a GPU, in one call of the device tool (bench/GPU.md):
#
#     run(command="bash bench/gpu_suite.sh", timeout_s=600)
#
# On a fresh GPU machine: prints the GPU, driver, torch and CUDA versions and measured
# ceilings (GEMM, copy); uses the module prebuilt here by .ci/cuda_build.sh when it was carried
# along and matches the GPU's torch, else builds the extension with CUDA for sm_90a only (both
# lent kinds are Hopper); runs `python -m csq_ext`, every device-parametrized test on CUDA
# (pytest -k cuda), compute-sanitizer memcheck on a tiny forward + backward, the GPU
# benchmark (bench/bench_gpu.py), a short CPU test subset, and racecheck / initcheck when time
# is left. Every stage has a timeout, a
# failed stage does not stop the next ones, and a summary table is printed last.
#
# Outputs in $OUT (./gpu_out when OUT is unset), at most 8 files:
#   suite.log      everything printed here            build.log      the compiler output
#   tests.log      pytest output (CUDA, then CPU)      sanitizer.log  compute-sanitizer output
#   gpu_<GPU>_torch<V>_cuda<V>_<date>.json / .md / .png   the benchmark (bench/bench_gpu.py)
#   decode_bw.json the decode step's bandwidth (bench/bench_decode.py; its table is in suite.log)
#
# Time: the whole suite keeps to GPU_SUITE_BUDGET seconds (default 540, inside the tool's
# 600 s), and every stage before the benchmark leaves GPU_SUITE_BENCH_RESERVE seconds
# (default 200) for it. Environment knobs (all optional):
#   GPU_SUITE_BUDGET=540  GPU_SUITE_BENCH_RESERVE=200  GPU_SUITE_QUICK=1 (bench --quick)
#   GPU_SUITE_BENCH_ARGS="..." (more bench_gpu.py options)  GPU_SUITE_ARCH=9.0a
#   GPU_SUITE_PYTEST_FLAGS="--maxfail=20" (e.g. -x)  MAX_JOBS=16  PYTHON=python3
#   GPU_SUITE_DRY_RUN=1: test this script on a machine without a GPU (no build, no
#   self-check, bench --dry-run; the GPU stages fail or skip, as they should there)
# It never changes the GPU's settings (clocks, power, modes) and never resets it.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT" || exit 1
PY="${PYTHON:-python3}"
BUDGET="${GPU_SUITE_BUDGET:-540}"
BENCH_RESERVE="${GPU_SUITE_BENCH_RESERVE:-200}"
ARCH="${GPU_SUITE_ARCH:-9.0a}"
PYTEST_FLAGS="${GPU_SUITE_PYTEST_FLAGS:---maxfail=20}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
TMP="$(mktemp -d /tmp/csq_gpu_suite.XXXXXX)"

NAMES=() STATUS=() SECS=() NOTES=()
BUILD_OK=0
DRY=0
[[ ${GPU_SUITE_DRY_RUN:-0} == 1 ]] && DRY=1

left() { echo $((DEADLINE - $(date +%s))); }
banner() { printf '\n==== %s  [t=%ds, %ds left]\n' "$1" $(($(date +%s) - T0)) "$(left)"; }
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("${4:-}"); }

# stage NAME CAP RESERVE LOG CMD...: runs CMD under `timeout min(CAP, left - RESERVE)`, its
# output to LOG (a file under $OUT, appended) or to the console when LOG is "-". Skipped when
# left - RESERVE is under 15 s. Records PASS / FAIL(rc) / TIMEOUT / SKIP.
stage() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local avail=$(( $(left) - reserve ))
  local t=$(( avail < cap ? avail : cap ))
  banner "$name (timeout ${t}s)"
  if (( avail < 15 )); then
    echo "SKIP: not enough time left"
    record "$name" SKIP 0 "no time left"
    return 1
  fi
  local start rc
  start=$(date +%s)
  # bash -c: CMD may be one of the exported functions below. timeout signals the whole
  # process group it starts, so python children die with it.
  if [[ $log == - ]]; then
    timeout -k 15 "$t" bash -c '"$@"' "$name" "$@"
    rc=$?
  else
    printf '\n==== %s: %s\n' "$name" "$*" >>"$OUT/$log"
    timeout -k 15 "$t" bash -c '"$@"' "$name" "$@" >>"$OUT/$log" 2>&1
    rc=$?
  fi
  local secs=$(( $(date +%s) - start )) st
  case $rc in
    0) st=PASS ;;
    124 | 137) st=TIMEOUT ;;
    *) st="FAIL($rc)" ;;
  esac
  echo "---- $name: $st in ${secs}s"
  record "$name" "$st" "$secs"
  return $rc
}
skip() { banner "$1"; echo "SKIP: $2"; record "$1" SKIP 0 "$2"; }
note() { [[ -n $1 ]] && NOTES[${#NOTES[@]} - 1]="$1"; }  # a note for the last stage

# --------------------------------------------------------------------------------------------
find_tools() {
  if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
      [[ -x $d/nvcc ]] && export PATH="$PATH:$d" && break
    done
  fi
  # The toolkit root, to find compute-sanitizer (torch's build finds CUDA_HOME the same way).
  local cuda_root=${CUDA_HOME:-/usr/local/cuda}
  if command -v nvcc >/dev/null; then
    cuda_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
  if ! command -v ninja >/dev/null; then  # the pip package's binary, for parallel builds
    local nd
    nd="$("$PY" -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null)" && export PATH="$PATH:$nd"
  fi
  SANITIZER="$(command -v compute-sanitizer || true)"
  if [[ -z $SANITIZER ]]; then
    for f in "$cuda_root/bin/compute-sanitizer" "$cuda_root/compute-sanitizer/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer \
             /opt/nvidia/compute-sanitizer/compute-sanitizer; do
      [[ -x $f ]] && SANITIZER=$f && break
    done
  fi
}

env_info() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -srm
  nvidia-smi || echo "nvidia-smi failed"
  local q=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu
  nvidia-smi --query-gpu="$q,power.draw,power.limit" --format=csv || true
  echo "nvcc: $(command -v nvcc || echo missing)"; nvcc --version 2>/dev/null | tail -2
  echo "CUDA_HOME=${CUDA_HOME:-unset}  ninja: $(command -v ninja || echo missing)"
  echo "compute-sanitizer: ${SANITIZER:-missing}"
  "$PY" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}, CUDA available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
for name in ("ninja", "pytest", "pytest_timeout", "matplotlib", "numpy", "setuptools"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', 'present')}")
    except ImportError:
        print(f"  {name} MISSING")
EOF
}

# Two ceilings to read the benchmark's TFLOP/s against (METHOD.md): bf16 tensor-core GEMM,
# fp32 GEMM without TF32 (CUDA cores: what the current CSQ kernels use), and a device copy.
ceilings() {
  "$PY" - <<'EOF'
import torch
torch.manual_seed(0)
ev = lambda: torch.cuda.Event(enable_timing=True)
def bench(fn, reps):
    for _ in range(3):
        fn()
    a, b = ev(), ev()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps
n = 8192
for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    x, y = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    s = bench(lambda: x @ y, 10 if dtype == torch.bfloat16 else 3)
    print(f"GEMM {n}^3 {str(dtype)[6:]:<9}(tf32 {tf32}): {2 * n**3 / s / 1e12:7.1f} TFLOP/s")
    del x, y
src = torch.randn(2**28, device="cuda")  # 1 GiB
dst = torch.empty_like(src)
s = bench(lambda: dst.copy_(src), 10)
print(f"device copy 1 GiB: {2 * src.numel() * 4 / s / 1e12:.2f} TB/s (read + write)")
EOF
}

build() {
  # A module prebuilt by .ci/cuda_build.sh and carried along (run(..., carry=[PREBUILT's
  # folder])) is used when it was built against this very torch: no minutes spent compiling.
  local prebuilt="${GPU_SUITE_PREBUILT:-$REPO/build-cuda-artifact}"
  if [[ -f $prebuilt/_C.abi3.so && -f $prebuilt/torch_git_version ]]; then
    local want have
    want=$(cat "$prebuilt/torch_git_version")
    have=$("$PY" -c 'import torch; print(torch.version.git_version)')
    if [[ $want == "$have" ]]; then
      echo "prebuilt module $prebuilt/_C.abi3.so matches torch $have: used, not built"
      rm -f "$REPO"/csq_ext/_C*.so
      cp "$prebuilt/_C.abi3.so" "$REPO/csq_ext/_C.abi3.so"
      return 0
    fi
    echo "prebuilt module is for torch $want, this torch is $have: building instead"
  fi
  echo "CSQ_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16}" \
    "$PY setup.py build_ext --inplace"
  env CSQ_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py build_ext --inplace
}

check_build() {
  "$PY" -c "
import os, torch, csq_ext
info = torch.ops.csq_ext.build_info()
print('csq_ext build:', info, '| loaded from', csq_ext.__file__)
if os.environ.get('GPU_SUITE_DRY_RUN') != '1':
    assert 'cuda' in info, 'the extension was built without its CUDA kernels'
    assert torch.cuda.is_available(), 'torch sees no GPU'
"
}

write_sanitize_snippet() {
  cat >"$TMP/sanitize_case.py" <<'EOF'
# A tiny forward + backward through every CUDA kernel of csq_ext, for compute-sanitizer.
import torch
import csq_ext
torch.manual_seed(0)
dev, bad = "cuda", 0
cases = [  # B, Hq, Hk, N, Dk, Dv, dtype, flags
    (1, 2, 1, 130, 64, 64, torch.bfloat16, {}),                      # partial chunk, GQA
    (2, 4, 2, 67, 16, 8, torch.float64, {}),
    (1, 2, 2, 70, 128, 128, torch.float32, {}),
    (1, 1, 1, 70, 256, 256, torch.float32, dict(path="chunked")),    # largest smem tiles
    (1, 2, 1, 65, 32, 24, torch.float16, dict(center=False, normalize=False)),
    (1, 1, 1, 1, 8, 8, torch.float32, {}),                           # N = 1
]
for B, Hq, Hk, N, Dk, Dv, dt, flags in cases:
    for causal in (True, False):
        q = torch.randn(B, N, Hq, Dk, device=dev, dtype=dt).transpose(1, 2)  # strided view
        k = torch.randn(B, Hk, N, Dk, device=dev, dtype=dt)
        v = torch.randn(B, Hk, N, Dv, device=dev, dtype=dt)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        shift = (0.5 + torch.rand(Hq, device=dev, dtype=sdt)).requires_grad_()
        y = csq_ext.attention(q, k, v, causal=causal, shift=shift, **flags)
        grads = torch.autograd.grad(y, (q, k, v, shift), torch.randn_like(y))
        torch.cuda.synchronize()
        ok = all(bool(torch.isfinite(t).all()) for t in (y, *grads))
        bad += not ok
        print(f"case B={B} Hq={Hq} Hk={Hk} N={N} Dk={Dk} Dv={Dv} {str(dt)[6:]} "
              f"causal={causal} {flags}: finite={ok}")
# Carried state: a state in (with gradients into its sums and ref), a state out (with a loss
# on it), packed segments with per-segment states, then an in-place decode step.
for dt in (torch.float32, torch.bfloat16):
    sdt = torch.float32
    q0, k0, v0 = (torch.randn(3, 2, 70, 16, device=dev, dtype=dt) for _ in range(3))
    _, st = csq_ext.attention(q0, k0[:, :1], v0[:, :1, :, :8], return_state=True)
    sums, ref = st.sums.detach().requires_grad_(), st.ref.detach().requires_grad_()
    cu = torch.tensor([0, 0, 1, 67], device=dev)
    q = torch.randn(1, 2, 67, 16, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, 1, 67, 16, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, 1, 67, 8, device=dev, dtype=dt, requires_grad=True)
    y, st2 = csq_ext.attention(q, k, v, cu_seqlens=cu, initial_state=csq_ext.CSQState(sums, ref),
                               return_state=True)
    grads = torch.autograd.grad(y.float().sum() + st2.sums.sum(), (q, k, v, sums, ref))
    out = torch.empty(3, 2, 1, 8, device=dev, dtype=dt)
    csq_ext.decode_(q0[:, :, :1], k0[:, :1, :1], v0[:, :1, :1, :8], st2.detach(), out=out)
    torch.cuda.synchronize()
    ok = all(bool(torch.isfinite(t).all()) for t in (y, st2.sums, out, *grads))
    bad += not ok
    print(f"case carried state, varlen, decode_ {str(dt)[6:]}: finite={ok}")
print("SANITIZE_CASE_DONE" + (f" ({bad} cases with non-finite outputs)" if bad else ""))
raise SystemExit(1 if bad else 0)
EOF
}

# sanitize TOOL: compute-sanitizer on the snippet; the caching allocator off, so that every
# tensor is its own cudaMalloc and an out-of-bounds access lands outside an allocation.
sanitize() {
  local tool=$1
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    --print-limit 30 "$PY" "$TMP/sanitize_case.py"
}
sanitizer_summary() {  # the summary lines of the last run of each tool
  grep -E "(ERROR|RACECHECK|INITCHECK|LEAK) SUMMARY|SANITIZE_CASE_DONE|Invalid|Error:" \
    "$OUT/sanitizer.log" | tail -n 12
}

# --------------------------------------------------------------------------------------------
summary() {
  banner "SUMMARY"
  # Files that come back: at most 8, names of letters, digits, '.', '_', '-'.
  local files
  files=$(find "$OUT" -type f | wc -l)
  ls -l "$OUT"
  if (( files > 8 )); then echo "WARNING: $files files in $OUT; only 8 come back"; fi
  "$PY" - "$OUT" <<'EOF' || true
import glob, json, os, sys
paths = sorted(glob.glob(os.path.join(sys.argv[1], "gpu_*.json")))
if not paths:
    print("benchmark: no JSON written")
    raise SystemExit
d = json.load(open(paths[-1]))
t, g = d.get("targets") or {}, d.get("gate") or {}
print(f"benchmark {os.path.basename(paths[-1])}: {d['device'].get('name')}, "
      f"baseline {d.get('baseline')}, {len(d.get('points', []))} points, "
      f"sweep {d.get('sweep_seconds')} s")
print(f"  correctness gate bf16 vs float64: {'PASS' if g.get('passed') else 'FAIL'}")
x = lambda r: "-" if r is None else f"{r:.2f}x"
if t:
    print(f"  target B,H,N={d['settings']['target']} causal SDPA/csq: fwd "
          f"{x(t.get('target_ratio_fwd'))}, fwd+bwd {x(t.get('target_ratio_fwd+bwd'))} "
          f"(goal >= 3x: {t.get('target_ratio_met')})")
    for k, c in t.get("crossover", {}).items():
        print(f"  crossover N {k:<14} {c['crossover_n']} (measured {c['measured_n']})")
    print(f"  causal fwd+bwd crossover <= 16384: {t.get('crossover_met')}")
else:
    print("  (no targets: the run stopped early; see suite.log)")
EOF
  printf '\n%-16s %-10s %6s  %s\n' STAGE STATUS SECONDS NOTE
  printf '%s\n' "------------------------------------------------------------------------"
  local i fails=0
  for i in "${!NAMES[@]}"; do
    printf '%-16s %-10s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    [[ ${STATUS[$i]} == PASS || ${STATUS[$i]} == SKIP ]] || fails=$((fails + 1))
  done
  printf 'total %ds of a %ds budget; outputs in %s\n' $(($(date +%s) - T0)) "$BUDGET" "$OUT"
  return $(( fails > 0 ))
}

main() {
  find_tools
  export PY TMP OUT ARCH SANITIZER
  export -f env_info ceilings build check_build sanitize
  (( DRY )) && echo "GPU_SUITE_DRY_RUN=1 (a test of this script): no build, no self-check," \
    "bench --dry-run"
  stage env 40 0 - env_info
  stage ceilings 40 "$BENCH_RESERVE" - ceilings

  if (( DRY )); then
    skip build "dry run: the extension already built here"
    stage build-check 60 "$BENCH_RESERVE" - check_build && BUILD_OK=1
  elif stage build 330 "$BENCH_RESERVE" build.log build; then
    tail -n 3 "$OUT/build.log"
    stage build-check 60 "$BENCH_RESERVE" - check_build && BUILD_OK=1
  else
    echo "build failed; the compiler's error lines, then the end of its output:"
    grep -E "error|Error" "$OUT/build.log" | head -n 20
    tail -n 25 "$OUT/build.log"
  fi

  if (( ! BUILD_OK )); then
    for s in selfcheck tests-cuda memcheck decode-bw bench tests-cpu; do skip "$s" "no usable build"; done
    summary
    return
  fi

  if (( DRY )); then skip selfcheck "dry run"
  else stage selfcheck 90 "$BENCH_RESERVE" - "$PY" -m csq_ext
  fi

  local tflag=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && tflag="--timeout=120"
  # shellcheck disable=SC2086
  # Every device-parametrized check on CUDA, and the GPU-only file (not the CPU emulator).
  stage tests-cuda 180 "$BENCH_RESERVE" tests.log "$PY" -m pytest -q tests -k "cuda and not emulator" \
    $PYTEST_FLAGS $tflag -rfE --durations=8 -p no:cacheprovider
  tail -n 30 "$OUT/tests.log" 2>/dev/null
  note "$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$OUT/tests.log" 2>/dev/null | tail -n 1)"

  if [[ -n $SANITIZER ]]; then
    write_sanitize_snippet
    stage memcheck 110 "$BENCH_RESERVE" sanitizer.log sanitize memcheck
    sanitizer_summary
    note "$(grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -n 1 | sed 's/^=* *//')"
  else
    skip memcheck "compute-sanitizer not found"
  fi

  # The decode step's bandwidth against the device's copy bandwidth (and a softmax KV-cache
  # step); its table goes to this log, its JSON to $OUT.
  local dec_extra=""
  (( DRY )) && dec_extra="--quick"
  # shellcheck disable=SC2086
  stage decode-bw 60 "$BENCH_RESERVE" - "$PY" bench/bench_decode.py --json "$OUT/decode_bw.json" \
    $dec_extra

  # The benchmark: its sweep budget is what is left minus ~60 s for its start, the gate and
  # the outputs; bench_gpu.py skips (records null) the points past it, least important last.
  local bench_budget=$(( $(left) - 60 )) extra=""
  (( bench_budget > 240 )) && bench_budget=240
  [[ ${GPU_SUITE_QUICK:-0} == 1 ]] && extra="--quick"
  (( DRY )) && extra="--dry-run"
  if (( bench_budget >= 20 )); then
    # shellcheck disable=SC2086
    stage bench 420 0 - "$PY" bench/bench_gpu.py --out-dir "$OUT" --budget-s "$bench_budget" \
      --keep-going $extra ${GPU_SUITE_BENCH_ARGS:-}
  else
    skip bench "no time left"
  fi

  tflag=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && tflag="--timeout=60"
  # shellcheck disable=SC2086
  stage tests-cpu 60 10 tests.log "$PY" -m pytest -q tests/test_forward.py -k float64 \
    $tflag -rfE -p no:cacheprovider
  note "$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$OUT/tests.log" 2>/dev/null | tail -n 1)"

  if [[ -n $SANITIZER ]]; then  # shared-memory races, then reads of uninitialized memory
    stage racecheck 120 10 sanitizer.log sanitize racecheck
    note "$(grep -E "RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -n 1 | sed 's/^=* *//')"
    stage initcheck 120 10 sanitizer.log sanitize initcheck
    note "$(grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -n 1 | sed 's/^=* *//')"
    sanitizer_summary
  fi
  summary
}

main "$@" 2>&1 | tee "$OUT/suite.log"
rc=${PIPESTATUS[0]}
rm -rf "$TMP"
exit "$rc"
