#!/usr/bin/env bash
# The GPU run in one command: `pytest -m gpu` and the whole benchmark suite, every log under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # = all: setup tests bench
#   OUT=/some/dir bash benchmarks/gpu_suite.sh logits      # one stage (several may be named)
#   OUT=/some/dir GPU_DEADLINE=540 bash benchmarks/gpu_suite.sh priority   # = make gpu-quick
#
# Stages
#   setup     installs benchmarks/wheels/*.whl (Liger-Kernel) with --no-index --no-deps when present,
#             builds the extension (pip install -e .) when it is missing or lacks its CUDA kernels
#             (RLHF_SKIP_BUILD=1 skips that), and records `rlhf-kernels info`, nvidia-smi and where a C++ error
#             raises or crashes (exceptions.md, benchmarks/exception_probe.py)
#   tests     pytest -m "gpu and not bulk", then -m "gpu and bulk" (the opt-in TMA copies) in a process of its own;
#             each failure also goes to pytest_gpu[_bulk]_failures.log as it happens
#   logits    logprobs, logprobs+ent            (N x V of DESIGN §6, bf16 and fp32)
#   klppo     kl_divergence, ppo_loss
#   linear    linear_logprobs, linear_cross_entropy, linear_ppo_loss (adds H = 2048, 4096)
#   gae       gae
#   trainer   end-to-end steps (benchmarks/bench_trainer.py, when it exists)
#   headline  re-measures our backends and Liger (not --resume) at the issues' target shapes, bf16:
#             logprobs(+ent), kl_divergence, ppo_loss at HEADLINE_SHAPES (default 8192x151936,16384x128256)
#   linear-headline  re-measures LINEAR_HEADLINE_OPS (default linear_cross_entropy, its +vocab variant
#             (chunk_by="vocab": no [V, H] float32 accumulator, issue 6's memory target), Liger with
#             accum_dtype=float32 (+liger-fp32acc: float32 weight-gradient accumulation, as ours), linear_logprobs (against
#             Liger's per-token reduction="none" path, issue 6's time target; vocabulary slabs by default for a bf16
#             head), linear_logprobs+rows (its row chunks), linear_logprobs+frozen (a LoRA-style frozen head), linear_ppo_loss) against eager
#             (materialised) and Liger at LINEAR_HEADLINE_SHAPES (default 8192x128256x4096,16384x151936x4096),
#             bf16; the run's matmul throughput (the floor) is measured with them
#   ppo-paths the cuda ppo_loss fwd+bwd at 8192x151936 bf16 (PPO_PATHS_SHAPES) under each RLHF_KERNELS_CUDA_PPO path
#             (PPO_PATHS; cluster+bulk and shared+bulk: with RLHF_KERNELS_CUDA_PREFETCH=bulk)
#   tune-cuda the CUDA forwards (logprobs+ent, kl_divergence, ppo_loss fwd and fused fwd+bwd) under each
#             RLHF_KERNELS_CUDA_FWD_THREADS cap, against Triton (benchmarks/tune_cuda.py; TUNE_CUDA_ARGS)
#   tune-triton every Triton forward autotune candidate (BLOCK_V x LANES_V x warps), the backward's block
#             table and where the rest of the op time goes (benchmarks/tune_triton.py; TUNE_TRITON_ARGS)
#   probe     where the fused PPO step's time goes inside its kernel: the probe instantiation timed with each
#             stage left out and stamping every CTA's phases (benchmarks/probe_ppo.py; PROBE_ARGS, default
#             cluster and global at 8192x151936 bf16): probe.md, probe_<path>.npz (raw stamps), probe_<path>.png
#   gemm-align the fused-linear GEMMs at GPT-2's V = 50257 (odd): one GEMM on the padded chunk buffer against
#             ops/_linear_gemm's aligned bulk + tail split, and V rounded up to 64 as the ceiling, bf16, H = 2048 and
#             4096 (benchmarks/gemm_alignment.py; GEMM_ALIGN_ARGS): gemm_alignment.md
#   host      where a ppo_loss / logprobs step goes at micro-batch sizes: GPU busy against idle time, host time,
#             launches, syncs and the ops with the most host time, validation on and off, ours against Liger
#             (benchmarks/step_profile.py; HOST_ARGS, default 4096x50257 and 16384x50257 bf16): step_profile.md
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on tests/cuda/sanitize_small.py
#   profile   Nsight Compute (SpeedOfLight, Occupancy, LaunchStats, WarpStateStats) on one call of each
#             bandwidth-bound kernel (benchmarks/profile_kernels.py; PROFILE_ARGS, e.g. "--cases logprobs"):
#             ncu_kernels.csv and the table ncu_summary.md
#   stalls    Nsight Compute's warp stall reasons (smsp__average_warps_issue_stalled_*) of the fused PPO kernel on
#             each CUDA path at 8192x151936 bf16 (benchmarks/profile_kernels.py --cases ppo_fwd+bwd/cuda):
#             ncu_stalls.csv and the table ncu_stalls.md, the probe's complement (what the warps wait on)
#   coverage  which cells of DESIGN §6's grid the results cover, and the commands for the rest
#             ($OUT/coverage.md; benchmarks/coverage.py), and the backend order per op the results suggest
#             against GPU_PREFERENCE ($OUT/preference.md; benchmarks/preference.py)
#   bench     logits klppo linear gae trainer coverage
#   grid      the gaps in DESIGN §6's grid (issue 5), resumed: klppo, gae and linear without torch.compile
#             (BENCH_PROVIDERS; its warm-up took over 60 s per ppo_loss shape in run 4), then klppo and linear
#             again for the compile rows, then coverage
#   all       setup tests bench                 (the default)
#   priority  what closes open issues fastest, for a short lent-GPU session (make gpu-quick), in order:
#             setup, headline at 8192x151936 only (unless HEADLINE_SHAPES is set), probe, host, tune-cuda,
#             linear-headline, gemm-align, tests, sanitize (memcheck, then racecheck and synccheck), tune-triton,
#             profile, stalls, then grid; with GPU_DEADLINE the later ones are skipped or cut when too little time is left
#
# GPU_DEADLINE=<seconds from the script's start> (default: none) bounds the whole run: a stage is
# skipped, with a note in gpu_suite.log, when less time is left than its rough minimum (STAGE_MIN
# below: build 90, tests 120, headline 75, linear-headline 120, each sanitize tool 90, profile 120,
# each bench stage 60); bench stages get --time-budget min(BENCH_BUDGET, time left - 20 s) (the two
# headline stages: min(HEADLINE_BUDGET, default 180 with a deadline, none without, time left - 20 s)),
# and every long command runs under `timeout`, sent SIGINT when the deadline nears (python then stops,
# keeping the rows of the providers it finished) and SIGKILL GRACE_S (default 10) s later.
# Stages that need a GPU (headline, linear-headline, ppo-paths, tune-cuda, tune-triton, sanitize, profile) say so and are
# skipped when $PYTHON's torch sees no CUDA device.
#
# Results go to $OUT/results/<device-slug>/ (csv, md, png, meta.json, run.log): the committed
# benchmarks/results/ is copied there first and each bench stage runs with --resume, so a stage cut
# short by BENCH_BUDGET (seconds of measuring per stage, default 420) or by a command time limit can
# simply be run again and continues where it stopped; rows are written after every provider, and
# --resume measures only the (op, mode, dtype, shape, provider) rows results.csv lacks.
# Copy $OUT/results/<device-slug>/ back to benchmarks/results/<device-slug>/ and commit it.
#
# TAR_OUT=<file>: everything under $OUT in one archive, rewritten after every stage (to TAR_OUT.part,
# then mv), so a command killed at its time limit still leaves the archive of the stages it finished.
# On the lent-GPU tool, whose $OUT returns at most 8 files, the tarball must lie in the tool's $OUT and
# the suite's own OUT elsewhere (set TAR_OUT first: the shell expands $OUT before OUT=/tmp/g applies):
#   TAR_OUT=$OUT/g.tgz OUT=/tmp/g RLHF_KERNELS_COMMIT=<sha> GPU_DEADLINE=540 make gpu-quick
# (or name stages: ... bash benchmarks/gpu_suite.sh setup tests logits), then unpack g.tgz here.
#
# That tool's copy of the tree keeps a stale .git, so pass the commit being measured, spelled out on this side:
# RLHF_KERNELS_COMMIT=<sha> (it stamps every result row instead of `git rev-parse HEAD`).
#
# Environment: OUT (default ./gpu_out), TAR_OUT, PYTHON (default python3), BENCH_BUDGET, BENCH_ARGS (extra
# arguments for every `python -m benchmarks.run`, e.g. "--mode all" or "--dtypes bf16"), RLHF_KERNELS_COMMIT,
# GPU_DEADLINE, GRACE_S, HEADLINE_SHAPES, LINEAR_HEADLINE_SHAPES, HEADLINE_BUDGET, BENCH_PROVIDERS (the bench
# stages' --providers; default: every provider), GPU_TEST_WORKERS (the tests stage's pytest-xdist workers, default 8).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET:-420}"
EXTRA="${BENCH_ARGS:-}"
DEADLINE="${GPU_DEADLINE:-}"
GRACE="${GRACE_S:-10}"
mkdir -p "$OUT"
RC=0

note() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_suite.log" >&2; }

# ---------------------------------------------------------------- the deadline (GPU_DEADLINE)
# Rough seconds a stage needs on an H100 to be worth starting (past logs: build ~65 s, pytest -m gpu
# 50-90 s, headline 45-60 s); a bench stage only needs to finish a few cases.
declare -A STAGE_MIN=([setup]=15 [build]=90 [tests]=120 [headline]=75 [linear-headline]=120
  [ppo-paths]=60 [tune-cuda]=60 [probe]=40 [gemm-align]=20 [host]=40 [tune-triton]=90 [sanitize]=90 [profile]=120 [stalls]=60 [logits]=60 [klppo]=60 [linear]=60 [gae]=60 [trainer]=60
  [coverage]=20)
if [ -n "$DEADLINE" ] && ! [[ "$DEADLINE" =~ ^[0-9]+$ ]]; then
  note "GPU_DEADLINE must be whole seconds, got '$DEADLINE'"; exit 2
fi
if [ -n "$DEADLINE" ] && ! command -v timeout >/dev/null; then
  note "GPU_DEADLINE: coreutils timeout not found; stages are still skipped by the deadline, commands are not cut"
fi
[ -n "$DEADLINE" ] && note "GPU_DEADLINE=$DEADLINE s from now"

left() { echo $(( DEADLINE - SECONDS )); }  # seconds to the deadline (only with GPU_DEADLINE)

gate() {  # gate <name>: 0 when there is time for it (or no deadline); else a note and 1
  [ -z "$DEADLINE" ] && return 0
  local need=${STAGE_MIN[$1]:-0} l
  l=$(left)
  if [ "$l" -lt "$need" ]; then
    note "$1: skipped by GPU_DEADLINE (${l} s left, it needs ~${need} s)"
    return 1
  fi
}

budget_for() {  # budget_for <seconds or empty>: that --time-budget, cut to the time left less 20 s
  local b=$1 l
  [ -z "$DEADLINE" ] && { echo "$b"; return; }
  l=$(( $(left) - 20 ))
  [ "$l" -lt 1 ] && l=1
  if [ -z "$b" ] || [ "$l" -lt "${b%.*}" ]; then echo "$l"; else echo "$b"; fi
}

limited() {  # limited <command...>: runs it; with GPU_DEADLINE under `timeout`, SIGINT before the deadline
  if [ -z "$DEADLINE" ] || ! command -v timeout >/dev/null; then "$@"; return; fi
  local t=$(( $(left) - GRACE - 5 ))
  [ "$t" -lt 5 ] && t=5
  timeout --signal=INT --kill-after="$GRACE" "$t" "$@"
}

was_cut() {  # was_cut <rc> <what>: 0 (and a note) when `limited` stopped it at the deadline
  case "$1" in
    124|137) [ -n "$DEADLINE" ] && { note "$2: cut at GPU_DEADLINE (rc=$1); what it wrote so far is kept"; return 0; } ;;
  esac
  return 1
}

HAVE_CUDA=""
need_cuda() {  # need_cuda <stage>: 0 when $PY's torch sees a CUDA device; else a note, RC=1 and 1
  if [ -z "$HAVE_CUDA" ]; then
    if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
      HAVE_CUDA=yes
    else
      HAVE_CUDA=no
    fi
  fi
  [ "$HAVE_CUDA" = yes ] && return 0
  if [ "$HAVE_CUDA" = no ]; then
    note "$1: skipped, $PY sees no CUDA device (torch.cuda.is_available() is False or torch does not import)"
    HAVE_CUDA=none
  else
    note "$1: skipped (no CUDA device)"
  fi
  RC=1
  return 1
}

# ---------------------------------------------------------------- the archive (TAR_OUT)
archive() {  # everything under $OUT into $TAR_OUT (via TAR_OUT.part, then mv), the tarball left out
  [ -z "${TAR_OUT:-}" ] && return 0
  local base part rc err
  base=$(basename "$TAR_OUT")
  part="$TAR_OUT.part"
  err=$(tar czf "$part" -C "$OUT" --exclude="$base" --exclude="$base.part" . 2>&1)
  rc=$?
  # 1: a file changed while it was read; the archive is still whole
  if [ $rc -le 1 ] && mv -f "$part" "$TAR_OUT"; then
    echo "[gpu_suite] archived to $TAR_OUT ($(du -k "$TAR_OUT" | cut -f1) KB)" >&2
  else
    note "archive to $TAR_OUT failed (tar rc=$rc): $err"
  fi
}

# ---------------------------------------------------------------- stages
stage_setup() {
  local rc
  shopt -s nullglob
  local wheels=(benchmarks/wheels/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    note "installing ${wheels[*]} (--no-index --no-deps)"
    limited "$PY" -m pip install --no-index --no-deps "${wheels[@]}" >"$OUT/pip_wheels.log" 2>&1 || note "wheel install failed (see pip_wheels.log)"
  fi
  if [ "${RLHF_SKIP_BUILD:-0}" != "1" ] && ! "$PY" -c "import sys, rlhf_kernels._ext as e; sys.exit(0 if e.has_cuda_kernels() else 1)" 2>/dev/null; then
    if gate build; then
      note "building the extension (pip install --no-build-isolation --no-deps -e .)"
      limited "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
      rc=$?
      if [ $rc -ne 0 ]; then was_cut $rc build || note "build failed (see build.log)"; RC=1; fi
    else
      RC=1
    fi
  fi
  { limited nvidia-smi || true; } >"$OUT/nvidia-smi.log" 2>&1
  limited "$PY" -m rlhf_kernels.cli info >"$OUT/info.log" 2>&1 || note "rlhf-kernels info failed (see info.log)"
  # where a C++ error of the extension raises and where it ends the process (runs 5 and 6 crashed on one)
  limited "$PY" -m benchmarks.exception_probe >"$OUT/exceptions.md" 2>&1 ||
    note "a C++ error crashed (see exceptions.md)"
  "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" >>"$OUT/info.log" 2>&1 || true
  cat "$OUT/info.log" >&2
}

stage_tests() {  # pytest -m gpu, in two processes: the opt-in bulk copies' tests (mark `bulk`) after the rest
  # (a kernel that traps ends its process's CUDA context, so a trap there cannot fail the main run's later tests)
  local marks log rc workers=() n=${GPU_TEST_WORKERS:-8}
  # pytest-xdist workers (GPU_TEST_WORKERS, default 8, 0 = one process): the GPU tests grew from 348 (run 5, 216 s
  # in one process) to 1112 (the random configurations, the spoiled arguments), and most of their time is the CPU's
  # (Triton compiles, references in float64); the workers share the one GPU. A worker a test kills is replaced,
  # and its test reported as failed, so one crash (run 6) no longer ends the run.
  if [ "$n" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then workers=(-n "$n"); fi
  for marks in "gpu and not bulk" "gpu and bulk"; do
    log=$OUT/pytest_gpu.log
    [ "$marks" = "gpu and bulk" ] && log=$OUT/pytest_gpu_bulk.log
    note "pytest -m \"$marks\""
    # --durations: where the GPU minutes go (run 3: 192 s of a 530 s session), to trim the slowest next time;
    # RLHF_KERNELS_TEST_FAILURES: each failure written as it happens (tests/conftest.py), so a test that ends the
    # process (run 6) cannot take the earlier failures' reports with it
    RLHF_KERNELS_TEST_FAILURES="${log%.log}_failures.log" \
      limited "$PY" -m pytest -m "$marks" "${workers[@]}" -q -rfEs --durations=25 -p no:cacheprovider >"$log" 2>&1
    rc=$?
    tail -n 15 "$log" >&2
    # 5: no test collected is not a failure of the suite
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then was_cut $rc "pytest -m $marks" || note "pytest -m $marks failed (rc=$rc)"; RC=1; fi
  done
}

seed_results() {
  if [ ! -d "$OUT/results" ]; then
    mkdir -p "$OUT/results"
    [ -d benchmarks/results ] && cp -r benchmarks/results/. "$OUT/results/"
  fi
}

bench() {  # bench <log-name> <benchmarks.run args...>
  local name=$1 budget rc; shift
  seed_results
  budget=$(budget_for "$BUDGET")
  local providers=()
  [ -n "${BENCH_PROVIDERS:-}" ] && providers=(--providers "$BENCH_PROVIDERS")
  note "python -m benchmarks.run $* ${providers[*]} --resume --time-budget $budget $EXTRA"
  # appended: the grid stage runs a bench stage twice (without torch.compile, then with it)
  # shellcheck disable=SC2086
  limited "$PY" -m benchmarks.run "$@" "${providers[@]}" --out "$OUT/results" --resume --time-budget "$budget" \
    --no-progress $EXTRA >>"$OUT/bench_$name.log" 2>&1
  rc=$?
  grep -E "^# (copy|matmul|wrote)|left out|skipped:|error|oom" "$OUT/bench_$name.log" | tail -n 40 >&2
  if [ $rc -ne 0 ]; then was_cut $rc "benchmarks.run $name" || { note "benchmarks.run $name exited $rc (see bench_$name.log)"; RC=1; }; fi
}

headline_run() {  # headline_run <log-name> <benchmarks.run args...>: re-measured (no --resume), on the GPU
  local name=$1 budget rc hb=${HEADLINE_BUDGET:-}; shift
  local args=("$@" --device cuda --out "$OUT/results" --no-progress)
  [ -n "$DEADLINE" ] && hb=${hb:-180}  # leaves the later stages their time
  budget=$(budget_for "$hb")
  [ -n "$budget" ] && args+=(--time-budget "$budget")
  note "python -m benchmarks.run ${args[*]} $EXTRA"
  # shellcheck disable=SC2086
  limited "$PY" -m benchmarks.run "${args[@]}" $EXTRA >"$OUT/bench_$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then was_cut $rc "${name//_/-}" || { note "${name//_/-} exited $rc (see bench_$name.log): $(tail -n 1 "$OUT/bench_$name.log")"; RC=1; }; fi
  grep -E "^# (copy|matmul)|left out| (eager|triton|cuda|liger) " "$OUT/bench_$name.log" | cut -c1-140 >&2
}

stage_headline() {  # stage_headline [default shapes]
  need_cuda headline || return
  seed_results
  note "headline: our backends and Liger at the target shapes (re-measured)"
  headline_run headline --ops logprobs,logprobs+ent,kl_divergence,ppo_loss,ppo_loss+overwrite,kl_divergence+overwrite \
    --shapes "${HEADLINE_SHAPES:-${1:-8192x151936,16384x128256}}" --dtypes bf16 --providers liger,triton,cuda
}

stage_linear_headline() {
  need_cuda linear-headline || return
  seed_results
  note "linear-headline: fused-linear losses, ours against eager (materialised) and Liger, and the matmul floor"
  headline_run linear_headline --ops "${LINEAR_HEADLINE_OPS:-linear_cross_entropy,linear_cross_entropy+vocab,linear_cross_entropy+liger-fp32acc,linear_logprobs,linear_logprobs+rows,linear_logprobs+frozen,linear_ppo_loss}" \
    --shapes "${LINEAR_HEADLINE_SHAPES:-8192x128256x4096,16384x151936x4096}" --dtypes bf16 --providers eager,triton,cuda,liger
}

stage_ppo_paths() {
  local path rc
  need_cuda ppo-paths || return
  # path+bulk: that path with its on-chip slice copied in by the TMA (RLHF_KERNELS_CUDA_PREFETCH=bulk)
  for path in ${PPO_PATHS:-cluster cluster+bulk pipe l2 global shared shared+bulk two-pass}; do
    [ -n "$DEADLINE" ] && [ "$(left)" -lt 20 ] && { note "ppo path $path: skipped by GPU_DEADLINE"; continue; }
    local fill=1
    [ "${path#*+}" = bulk ] && fill=bulk
    RLHF_KERNELS_CUDA_PPO=${path%+bulk} RLHF_KERNELS_CUDA_PREFETCH=$fill limited "$PY" -m benchmarks.run --ops ppo_loss \
      --providers cuda --shapes "${PPO_PATHS_SHAPES:-8192x151936}" --dtypes bf16 --mode fwd+bwd --no-plots --no-progress \
      --out "$OUT/ppo_paths_$path" >"$OUT/bench_ppo_$path.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && { was_cut $rc "ppo path $path" || note "ppo path $path exited $rc (see bench_ppo_$path.log)"; }
    echo "RLHF_KERNELS_CUDA_PPO=$path: $(grep -E ' cuda ' "$OUT/bench_ppo_$path.log" | cut -c1-140)" >&2
  done
}

run_tuner() {  # run_tuner <stage> <module> <what> [args]: benchmarks.<module> on the GPU, log in $OUT/<module>.log
  local rc
  need_cuda "$1" || return
  note "$1: $3"
  # shellcheck disable=SC2086
  limited "$PY" -m "benchmarks.$2" ${4:-} >"$OUT/$2.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && { was_cut $rc "$1" || note "$2 exited $rc (see $2.log)"; }
  grep -E "%|^#" "$OUT/$2.log" >&2
}

stage_tune_cuda() {  # the CUDA forwards' CTA size cap against Triton (benchmarks/tune_cuda.py)
  run_tuner tune-cuda tune_cuda "RLHF_KERNELS_CUDA_FWD_THREADS sweep, cuda against triton at 8192x151936 bf16" \
    "${TUNE_CUDA_ARGS:-}"
}

stage_probe() {  # the fused PPO kernel's probe (benchmarks/probe_ppo.py); its files beside the logs, which
  # merge_gpu_results copies (top-level files only)
  run_tuner probe probe_ppo "the fused PPO step's stages and CTA phases at 8192x151936 bf16" \
    "--out $OUT ${PROBE_ARGS:-}"
}

stage_gemm_align() {  # one GEMM against the split at an unaligned vocabulary (benchmarks/gemm_alignment.py)
  run_tuner gemm-align gemm_alignment "the fused-linear GEMMs at V = 50257: one GEMM against the aligned split" \
    "--out $OUT ${GEMM_ALIGN_ARGS:-}"
}

stage_host() {  # the micro-batch step's host and GPU time (benchmarks/step_profile.py)
  # (ppo_loss+overwrite: Triton's two-pass form beside its fused step, and CUDA's step writing over the logits)
  run_tuner host step_profile "ppo_loss and logprobs steps at micro-batch shapes: GPU idle time and host ops" \
    "--out $OUT --shapes 4096x50257,16384x50257 --ops ppo_loss,ppo_loss+overwrite,logprobs ${HOST_ARGS:-}"
}

stage_tune_triton() {  # the Triton forwards' autotune candidates and the backward's blocks (benchmarks/tune_triton.py)
  run_tuner tune-triton tune_triton "Triton forward candidates and backward blocks at 8192x151936 bf16" \
    "${TUNE_TRITON_ARGS:-}"
}

cuda_tool() {  # cuda_tool <name>: the CUDA toolkit's binary, on PATH or under the usual roots
  command -v "$1" 2>/dev/null && return
  ls /usr/local/cuda*/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -n 1
}

stage_sanitize() {  # stage_sanitize [tools...] (default memcheck racecheck synccheck), each one gated
  local cs tool rc
  need_cuda sanitize || return
  cs=$(cuda_tool compute-sanitizer)
  if [ -z "$cs" ]; then note "sanitize: compute-sanitizer not found"; return; fi
  [ $# -eq 0 ] && set -- memcheck racecheck synccheck
  for tool in "$@"; do
    gate sanitize || { note "compute-sanitizer $tool: not run"; continue; }
    limited "$cs" --tool "$tool" --error-exitcode 9 "$PY" tests/cuda/sanitize_small.py >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    was_cut $rc "compute-sanitizer $tool" && { RC=1; continue; }
    note "compute-sanitizer $tool: rc=$rc $(grep -E 'SUMMARY' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
    [ $rc -ne 0 ] && RC=1
  done
}

stage_profile() {
  local ncu rc
  need_cuda profile || return
  ncu=$(cuda_tool ncu)
  if [ -z "$ncu" ]; then
    note "profile: ncu not found; CUDA-event times only"
    # shellcheck disable=SC2086
    limited "$PY" -m benchmarks.profile_kernels ${PROFILE_ARGS:-} >"$OUT/profile_times.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && { was_cut $rc profile || note "profile_kernels exited $rc (see profile_times.log)"; }
    return
  fi
  note "profile: $ncu on benchmarks/profile_kernels.py ${PROFILE_ARGS:-}"
  # shellcheck disable=SC2086
  limited "$ncu" --profile-from-start off --clock-control none --kernel-name 'regex:logprobs|kl_|ppo' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --csv --page details --log-file "$OUT/ncu_kernels.csv" \
    "$PY" -m benchmarks.profile_kernels ${PROFILE_ARGS:-} >"$OUT/profile_times.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && { was_cut $rc ncu || { note "ncu exited $rc (see profile_times.log)"; RC=1; }; }
  "$PY" -m benchmarks.profile_kernels --summarize "$OUT/ncu_kernels.csv" >"$OUT/ncu_summary.md" 2>>"$OUT/profile_times.log" \
    && cat "$OUT/ncu_summary.md" >&2
}

stage_stalls() {
  local ncu rc
  need_cuda stalls || return
  ncu=$(cuda_tool ncu)
  if [ -z "$ncu" ]; then note "stalls: ncu not found"; return; fi
  note "stalls: $ncu warp stall reasons of ppo_fwd on each CUDA path"
  limited "$ncu" --profile-from-start off --clock-control none --kernel-name 'regex:ppo_fwd' \
    --metrics 'regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$' \
    --csv --page raw --log-file "$OUT/ncu_stalls.csv" \
    "$PY" -m benchmarks.profile_kernels --cases ppo_fwd+bwd/cuda >"$OUT/stalls_times.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && { was_cut $rc stalls || { note "ncu (stalls) exited $rc (see stalls_times.log)"; RC=1; }; }
  "$PY" -m benchmarks.profile_kernels --stalls "$OUT/ncu_stalls.csv" >"$OUT/ncu_stalls.md" 2>>"$OUT/stalls_times.log" \
    && cat "$OUT/ncu_stalls.md" >&2
}

stage_coverage() {
  seed_results
  local dirs=("$OUT"/results/*/results.csv) d list=() rc
  for d in "${dirs[@]}"; do case "$d" in */cpu-*) ;; *) list+=("$(dirname "$d")") ;; esac; done
  if [ ${#list[@]} -eq 0 ]; then note "coverage: no GPU results yet"; return; fi
  limited "$PY" -m benchmarks.coverage "${list[@]}" --out "$OUT/coverage.md" >/dev/null 2>"$OUT/coverage.err"
  rc=$?
  if [ $rc -ne 0 ]; then was_cut $rc coverage || note "coverage failed (see coverage.err)"; return; fi
  grep -E "^## Coverage" "$OUT/coverage.md" >&2
  # the backend order the results suggest per op, beside GPU_PREFERENCE's (benchmarks/preference.py)
  : >"$OUT/preference.md"
  for d in "${list[@]}"; do "$PY" -m benchmarks.preference "$d" >>"$OUT/preference.md" 2>>"$OUT/coverage.err"; done
  grep -c "differs" "$OUT/preference.md" | sed 's/^/preference: table rows whose suggested order differs from GPU_PREFERENCE: /' >&2
}

STAGES="setup tests logits klppo linear gae trainer headline linear-headline ppo-paths tune-cuda tune-triton probe gemm-align host sanitize profile stalls coverage bench grid all priority"

run_stage() {  # run_stage <stage> [args]: a composite calls run_stage per part; a single stage is gated, then archived
  case "$1" in
    bench) for s in logits klppo linear gae trainer coverage; do run_stage "$s"; done; return ;;
    all) for s in setup tests bench; do run_stage "$s"; done; return ;;
    grid)
      # the grid's gaps, kl / ppo first (fewest cells covered): every shape of our backends and the fast
      # competitors first, then the torch.compile rows (resumed, so only those are measured)
      for s in klppo gae linear; do BENCH_PROVIDERS=eager,chunked,triton,cuda,cpu,liger run_stage "$s"; done
      for s in klppo linear; do run_stage "$s"; done
      run_stage coverage
      return ;;
    priority)
      run_stage setup
      run_stage headline 8192x151936
      run_stage probe
      run_stage host
      run_stage tune-cuda
      run_stage linear-headline
      run_stage gemm-align
      run_stage tests
      run_stage sanitize memcheck
      run_stage sanitize racecheck synccheck
      run_stage tune-triton
      run_stage profile
      run_stage stalls
      run_stage grid  # time left: the grid's gaps (issue 5)
      return ;;
  esac
  case " $STAGES " in
    *" $1 "*) ;;
    *) note "unknown stage '$1' ($STAGES)"; RC=2; return ;;
  esac
  gate "$1" || return  # (sanitize also gates each of its tools)
  case "$1" in
    setup) stage_setup ;;
    tests) stage_tests ;;
    logits) bench logits --ops logprobs,logprobs+ent ;;
    klppo) bench klppo --ops kl_divergence,ppo_loss ;;
    linear) bench linear --ops linear_logprobs,linear_cross_entropy,linear_ppo_loss ;;
    gae) bench gae --ops gae ;;
    trainer) bench trainer --ops trainer ;;
    headline) stage_headline "${2:-}" ;;
    linear-headline) stage_linear_headline ;;
    ppo-paths) stage_ppo_paths ;;
    tune-cuda) stage_tune_cuda ;;
    tune-triton) stage_tune_triton ;;
    probe) stage_probe ;;
    gemm-align) stage_gemm_align ;;
    host) stage_host ;;
    coverage) stage_coverage ;;
    sanitize) shift; stage_sanitize "$@" ;;
    profile) stage_profile ;;
    stalls) stage_stalls ;;
  esac
  archive
}

[ $# -eq 0 ] && set -- all
for stage in "$@"; do run_stage "$stage"; done
note "done (rc=$RC); results in $OUT/results"
archive
exit $RC
