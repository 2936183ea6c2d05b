#!/usr/bin/env bash
# The GPU run in one command: `pytest -m gpu` and the whole benchmark suite, every log under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # = all: setup tests bench
#   OUT=/some/dir bash benchmarks/gpu_suite.sh logits      # one stage (several may be named)
#
# Stages
#   setup     installs benchmarks/wheels/*.whl (Liger-Kernel) with --no-index --no-deps when present,
#             builds the extension (pip install -e .) when it is missing or lacks its CUDA kernels
#             (RLHF_SKIP_BUILD=1 skips that), and records `rlhf-kernels info` and nvidia-smi
#   tests     pytest -m gpu
#   logits    logprobs, logprobs+ent            (N x V of DESIGN §6, bf16 and fp32)
#   klppo     kl_divergence, ppo_loss
#   linear    linear_logprobs, linear_cross_entropy, linear_ppo_loss (adds H = 2048, 4096)
#   gae       gae
#   trainer   end-to-end steps (benchmarks/bench_trainer.py, when it exists)
#   headline  re-measures our backends and Liger (not --resume) at the issues' target shapes, bf16:
#             logprobs(+ent), kl_divergence, ppo_loss at 8192x151936 and 16384x128256
#   ppo-paths the cuda ppo_loss fwd+bwd at 8192x151936 bf16 under each RLHF_KERNELS_CUDA_PPO path
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on tests/cuda/sanitize_small.py
#   profile   Nsight Compute (SpeedOfLight, Occupancy, LaunchStats, WarpStateStats) on one call of each
#             bandwidth-bound kernel (benchmarks/profile_kernels.py; PROFILE_ARGS, e.g. "--cases logprobs"):
#             ncu_kernels.csv and the table ncu_summary.md
#   coverage  which cells of DESIGN §6's grid the results cover, and the commands for the rest
#             ($OUT/coverage.md; benchmarks/coverage.py)
#   bench     logits klppo linear gae trainer coverage
#   all       setup tests bench                 (the default)
#
# Results go to $OUT/results/<device-slug>/ (csv, md, png, meta.json, run.log): the committed
# benchmarks/results/ is copied there first and each bench stage runs with --resume, so a stage cut
# short by BENCH_BUDGET (seconds of measuring per stage, default 420) or by a command time limit can
# simply be run again and continues where it stopped; rows are written after every case.
# Copy $OUT/results/<device-slug>/ back to benchmarks/results/<device-slug>/ and commit it.
#
# On the lent-GPU tool, whose $OUT returns at most 8 files: OUT=/tmp/g TAR_OUT=$OUT/gpu.tgz make gpu
# (or name stages: ... bash benchmarks/gpu_suite.sh setup tests logits), then unpack gpu.tgz here.
#
# That tool's copy of the tree keeps a stale .git, so pass the commit being measured, spelled out on this side:
# RLHF_KERNELS_COMMIT=<sha> (it stamps every result row instead of `git rev-parse HEAD`).
#
# Environment: OUT (default ./gpu_out), TAR_OUT, PYTHON (default python3), BENCH_BUDGET, BENCH_ARGS (extra
# arguments for every `python -m benchmarks.run`, e.g. "--mode all" or "--dtypes bf16"), RLHF_KERNELS_COMMIT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET:-420}"
EXTRA="${BENCH_ARGS:-}"
mkdir -p "$OUT"
RC=0

note() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_suite.log" >&2; }

stage_setup() {
  shopt -s nullglob
  local wheels=(benchmarks/wheels/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    note "installing ${wheels[*]} (--no-index --no-deps)"
    "$PY" -m pip install --no-index --no-deps "${wheels[@]}" >"$OUT/pip_wheels.log" 2>&1 || note "wheel install failed (see pip_wheels.log)"
  fi
  if [ "${RLHF_SKIP_BUILD:-0}" != "1" ] && ! "$PY" -c "import sys, rlhf_kernels._ext as e; sys.exit(0 if e.has_cuda_kernels() else 1)" 2>/dev/null; then
    note "building the extension (pip install --no-build-isolation --no-deps -e .)"
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { note "build failed (see build.log)"; RC=1; }
  fi
  { nvidia-smi || true; } >"$OUT/nvidia-smi.log" 2>&1
  "$PY" -m rlhf_kernels.cli info >"$OUT/info.log" 2>&1 || note "rlhf-kernels info failed (see info.log)"
  "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" >>"$OUT/info.log" 2>&1 || true
  cat "$OUT/info.log" >&2
}

stage_tests() {
  note "pytest -m gpu"
  "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/pytest_gpu.log" >&2
  # 5: no test collected is not a failure of the suite
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then note "pytest -m gpu failed (rc=$rc)"; RC=1; fi
}

seed_results() {
  if [ ! -d "$OUT/results" ]; then
    mkdir -p "$OUT/results"
    [ -d benchmarks/results ] && cp -r benchmarks/results/. "$OUT/results/"
  fi
}

bench() {  # bench <log-name> <benchmarks.run args...>
  local name=$1; shift
  seed_results
  note "python -m benchmarks.run $* --resume --time-budget $BUDGET $EXTRA"
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.run "$@" --out "$OUT/results" --resume --time-budget "$BUDGET" --no-progress $EXTRA \
    >"$OUT/bench_$name.log" 2>&1
  local rc=$?
  grep -E "^# (copy|matmul|wrote)|left out|skipped:|error|oom" "$OUT/bench_$name.log" | tail -n 40 >&2
  if [ $rc -ne 0 ]; then note "benchmarks.run $name exited $rc (see bench_$name.log)"; RC=1; fi
}

stage_headline() {
  seed_results
  note "headline: our backends and Liger at the target shapes (re-measured)"
  "$PY" -m benchmarks.run --ops logprobs,logprobs+ent,kl_divergence,ppo_loss --shapes "${HEADLINE_SHAPES:-8192x151936,16384x128256}" \
    --dtypes bf16 --providers liger,triton,cuda --out "$OUT/results" --no-progress $EXTRA >"$OUT/bench_headline.log" 2>&1 \
    || { note "headline exited $? (see bench_headline.log)"; RC=1; }
  grep -E " (triton|cuda|liger) " "$OUT/bench_headline.log" | cut -c1-140 >&2
}

stage_ppo_paths() {
  local path
  for path in ${PPO_PATHS:-shared cluster global two-pass}; do
    RLHF_KERNELS_CUDA_PPO=$path "$PY" -m benchmarks.run --ops ppo_loss --providers cuda --shapes 8192x151936 \
      --dtypes bf16 --mode fwd+bwd --no-plots --no-progress --out "$OUT/ppo_paths_$path" >"$OUT/bench_ppo_$path.log" 2>&1 \
      || note "ppo path $path exited $? (see bench_ppo_$path.log)"
    echo "RLHF_KERNELS_CUDA_PPO=$path: $(grep -E ' cuda ' "$OUT/bench_ppo_$path.log" | cut -c1-140)" >&2
  done
}

cuda_tool() {  # cuda_tool <name>: the CUDA toolkit's binary, on PATH or under the usual roots
  command -v "$1" 2>/dev/null && return
  ls /usr/local/cuda*/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -n 1
}

stage_sanitize() {
  local cs tool rc
  cs=$(cuda_tool compute-sanitizer)
  if [ -z "$cs" ]; then note "sanitize: compute-sanitizer not found"; return; fi
  for tool in memcheck racecheck synccheck; do
    "$cs" --tool "$tool" --error-exitcode 9 "$PY" tests/cuda/sanitize_small.py >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool: rc=$rc $(grep -E 'SUMMARY' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
    [ $rc -ne 0 ] && RC=1
  done
}

stage_profile() {
  local ncu
  ncu=$(cuda_tool ncu)
  if [ -z "$ncu" ]; then
    note "profile: ncu not found; CUDA-event times only"
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.profile_kernels ${PROFILE_ARGS:-} >"$OUT/profile_times.log" 2>&1
    return
  fi
  note "profile: $ncu on benchmarks/profile_kernels.py ${PROFILE_ARGS:-}"
  # shellcheck disable=SC2086
  "$ncu" --profile-from-start off --clock-control none --kernel-name 'regex:logprobs|kl_|ppo' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --csv --page details --log-file "$OUT/ncu_kernels.csv" \
    "$PY" -m benchmarks.profile_kernels ${PROFILE_ARGS:-} >"$OUT/profile_times.log" 2>&1 \
    || { note "ncu exited $? (see profile_times.log)"; RC=1; }
  "$PY" -m benchmarks.profile_kernels --summarize "$OUT/ncu_kernels.csv" >"$OUT/ncu_summary.md" 2>>"$OUT/profile_times.log" \
    && cat "$OUT/ncu_summary.md" >&2
}

stage_coverage() {
  seed_results
  local dirs=("$OUT"/results/*/results.csv) d list=()
  for d in "${dirs[@]}"; do case "$d" in */cpu-*) ;; *) list+=("$(dirname "$d")") ;; esac; done
  if [ ${#list[@]} -eq 0 ]; then note "coverage: no GPU results yet"; return; fi
  "$PY" -m benchmarks.coverage "${list[@]}" --out "$OUT/coverage.md" >/dev/null 2>"$OUT/coverage.err" \
    || { note "coverage failed (see coverage.err)"; return; }
  grep -E "^## Coverage" "$OUT/coverage.md" >&2
}

run_stage() {
  case "$1" in
    setup) stage_setup ;;
    tests) stage_tests ;;
    logits) bench logits --ops logprobs,logprobs+ent ;;
    klppo) bench klppo --ops kl_divergence,ppo_loss ;;
    linear) bench linear --ops linear_logprobs,linear_cross_entropy,linear_ppo_loss ;;
    gae) bench gae --ops gae ;;
    trainer) bench trainer --ops trainer ;;
    headline) stage_headline ;;
    ppo-paths) stage_ppo_paths ;;
    coverage) stage_coverage ;;
    sanitize) stage_sanitize ;;
    profile) stage_profile ;;
    bench) for s in logits klppo linear gae trainer coverage; do run_stage "$s"; done ;;
    all) for s in setup tests bench; do run_stage "$s"; done ;;
    *) note "unknown stage '$1' (setup tests logits klppo linear gae trainer headline ppo-paths sanitize profile coverage bench all)"; RC=2 ;;
  esac
}

[ $# -eq 0 ] && set -- all
for stage in "$@"; do run_stage "$stage"; done
note "done (rc=$RC); results in $OUT/results"
# TAR_OUT=<file>: everything under $OUT in one archive (a remote runner that returns only a few files)
if [ -n "${TAR_OUT:-}" ]; then tar czf "$TAR_OUT" -C "$OUT" . && note "archived to $TAR_OUT"; fi
exit $RC
