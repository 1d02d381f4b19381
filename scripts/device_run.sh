#!/usr/bin/env bash
# A prepared GPU run: the tests that need CUDA, then the benchmarks at real sizes, each
# step in its own process under its own `timeout`, so that one failure or hang loses only
# itself. Results: JSON per step plus run.json and summary.md under OUTDIR (8 files at
# most, as a device run brings back), rewritten after every step, so a run cut short
# still leaves a summary of what it did.
#
# Usage
#   bash scripts/device_wheels.sh                  # here, once: the wheels the GPU machine lacks -> .whl/
#   bash scripts/device_run.sh OUTDIR              # on the GPU machine, in the repository root
#   bash scripts/device_run.sh OUTDIR --dry-run    # here: every step at toy size on CPU (1-2 minutes)
# From a session, with the device tool (carry the wheels; leave time for the start and a rerun):
#   run(command='bash scripts/device_run.sh "$OUT"', carry=[".whl"], timeout_s=560)
#
# Steps (name: what it measures; JSON written as OUTDIR/NAME.json):
#   cuda_tests        pytest on the tests that need CUDA (named *cuda* or skipped without it)
#   methods           ViT-B/16 (12 blocks) batch 32 training step, fp32: every method against
#                     our LoRA and PEFT's LoRA / LoKr / LoHa / WaveFT, time and CUDA peak memory
#   methods_compiled  the same for SNELL / SNELLA in vp.kernels(compiled=True) (Triton) against eager SNELL
#   dreambooth        SD1.5 UNet (random init) DreamBooth step at 512 px, bf16: our LoRA / KronA /
#                     WaRA against the diffusers example's PEFT LoRA
#   switch            switching cost with 1, 10, 100 LoRAs loaded (diffusers' set_adapters up to 30)
#   cd                PeftCD training step on Hiera-B+ and DINOv3 ViT-B (random init), 256 px,
#                     batch 8, and sliding-window inference
#   fewshot           (only when DEVICE_RUN_STEPS names it: the default run already brings back
#                     8 files) CLIP-LoRA's few-shot step on the whole ViT-B/16 CLIP (random init),
#                     batch 32, fp32 and fp16 autocast: Block-LoRA n 2/4/8 against our LoRA and
#                     PEFT's LoRA; needs open_clip (device_wheels.sh fetches it), e.g.
#                     DEVICE_RUN_STEPS="cuda_tests methods fewshot" bash scripts/device_run.sh OUTDIR
#   points            (only when named, as fewshot) Point-PEFT against full fine-tuning at Point-MAE's
#                     full size (384 x 12, 2048 points in 128 groups), batch 32, and FPS / kNN
#                     throughput against the references, e.g. DEVICE_RUN_STEPS="points fewshot"
# Environment:
#   PYTHON               the interpreter (default: python3)
#   DEVICE_RUN_BUDGET_S  seconds for the whole run (default 480; dry run 240, a bound on a
#                        loaded machine: it takes 1-2 minutes); every step's
#                        timeout is cut so that each later step keeps at least a minimum
#   DEVICE_RUN_STEPS     the steps to run, space-separated (default: all but fewshot)
#   DEVICE_RUN_THREADS   CPU threads per step (default: nproc; dry run 1)
# Installs: the package from this tree (linked into a temporary folder on PYTHONPATH), and
# from .whl/ only the distributions the machine lacks (into the same folder). Nothing is
# downloaded (HF_HUB_OFFLINE=1).
# Exit status: 0 when no step failed (skipped steps say why in summary.md), 1 when one
# did, 2 on bad usage.
set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
DRY=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry-run ]] || usage; DRY=1; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || usage
OUTDIR=$(cd "$1" && pwd)  # resolved where the caller stands, before moving to the root
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "no python: $PY (set PYTHON)" >&2; exit 2; }
TOOLS="$ROOT/scripts/device_tools.py"
START=$(date +%s)
if (( DRY )); then
  # one thread: on a shared 2-core machine, 2 OpenMP threads that wait on each other's
  # core made the toy steps 3-5x slower than one
  BUDGET=${DEVICE_RUN_BUDGET_S:-240}; THREADS=${DEVICE_RUN_THREADS:-1}; MIN_STEP=10; DEVICE=cpu
  export OMP_NUM_THREADS=$THREADS
else
  BUDGET=${DEVICE_RUN_BUDGET_S:-480}; THREADS=${DEVICE_RUN_THREADS:-$(nproc)}; MIN_STEP=40; DEVICE=cuda
fi
ALL_STEPS="cuda_tests methods methods_compiled dreambooth switch cd"
EXTRA_STEPS="fewshot points"  # run only when named: each step brings back one file, and 8 come back at most
WANT=${DEVICE_RUN_STEPS:-$ALL_STEPS}
STEPS_LEFT=0
for s in $ALL_STEPS $EXTRA_STEPS; do [[ " $WANT " == *" $s "* ]] && STEPS_LEFT=$((STEPS_LEFT + 1)); done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# the package from this tree and the carried wheels the machine lacks, in one folder put
# first on the path: the package goes in as a link, so that the tree's other folders
# (datasets/, tests/, scripts/) are not importable top-level names for every library
SITE="$WORK/site"
mkdir -p "$SITE" && ln -s "$ROOT/visionpeft" "$SITE/visionpeft"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg TQDM_DISABLE=1
# nothing written into the tree or the home folder: no bytecode (the installed packages'
# own __pycache__ is still read: a private PYTHONPYCACHEPREFIX made every step recompile
# torch's and diffusers' sources), Triton's cache in the run's temporary folder, and a
# caller's pytest options (--cov, -n) do not reach ours
unset PYTHONPYCACHEPREFIX
export PYTHONDONTWRITEBYTECODE=1 TRITON_CACHE_DIR="$WORK/triton"
unset PYTEST_ADDOPTS
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# only what this script writes is cleared: a rerun into the same folder starts clean
for f in run.json summary.md $ALL_STEPS $EXTRA_STEPS; do rm -f "$OUTDIR/$f" "$OUTDIR/$f.json"; done
# which code ran: the commit, and whether the tree differed from it (where .git came along)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ $COMMIT != unknown && -n $(git --no-optional-locks -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] \
  && COMMIT="$COMMIT+changes"
printf '{"dry_run": %s, "started": "%s", "start_epoch": %s, "budget_s": %s, "threads": %s, "device": "%s", "commit": "%s"}\n' \
  "$([[ $DRY == 1 ]] && echo true || echo false)" "$(date '+%Y-%m-%d %H:%M:%S')" "$START" "$BUDGET" \
  "$THREADS" "$DEVICE" "$COMMIT" > "$WORK/meta.json"
: > "$WORK/steps.jsonl"

echo "=== device run ($([[ $DRY == 1 ]] && echo "dry run, CPU, toy sizes" || echo GPU)), budget ${BUDGET}s, into $OUTDIR"
echo "=== nvidia-smi"
if command -v nvidia-smi >/dev/null; then timeout -k 5 20 nvidia-smi || echo "nvidia-smi: failed or timed out"
else echo "nvidia-smi: not found"; fi
echo "=== install"
# both bounded: a hang here must not eat the steps' time (a failure leaves the steps to
# say what is missing)
timeout -k 5 120 "$PY" "$TOOLS" install --wheels "$ROOT/.whl" --site "$SITE" --out "$WORK/install.json" \
  || echo "install: failed or timed out (exit $?); going on with what is installed"
echo "=== versions"
ENV_ARGS=(--out "$WORK/env.json")
(( DRY )) && ENV_ARGS+=(--dry-run)
timeout -k 5 150 "$PY" "$TOOLS" env "${ENV_ARGS[@]}" || echo "env: failed or timed out (exit $?)"
"$PY" "$TOOLS" report --work "$WORK" --outdir "$OUTDIR"

FAILED=0
record() {  # record NAME STATUS SECONDS TIMEOUT NOTE CMD
  "$PY" "$TOOLS" record --work "$WORK" --outdir "$OUTDIR" --name "$1" --status "$2" --seconds "$3" \
    --timeout "$4" --note "$5" --cmd "$6" --log "$WORK/$1.log"
  [[ $2 == failed ]] && FAILED=1
  return 0
}

# run_step NAME CAP "MODULES" POST CMD...: CMD under `timeout`, at most CAP seconds and
# never so long that a later step is left less than MIN_STEP; skipped with the reason when
# a module it needs is missing or broken. POST (a function, or -), given the exit status,
# writes the step's JSON and decides its status (exit 0: ok; its output: the note); without
# one, the command must exit 0 and leave the step's JSON.
run_step() {
  local name=$1 cap=$2 modules=$3 post=$4; shift 4
  [[ " $WANT " == *" $name "* ]] || return 0
  (( DRY && cap > 60 )) && cap=60  # toy sizes: a minute is a hang
  STEPS_LEFT=$((STEPS_LEFT - 1))
  local left=$(( BUDGET - ($(date +%s) - START) - STEPS_LEFT * MIN_STEP ))
  local t=$(( cap < left ? cap : left )) cmd="$*" why status note rc t0 secs
  echo "=== step $name (timeout ${t}s): $cmd"
  if (( t < 5 )); then
    record "$name" skipped 0 0 "out of the time budget (${BUDGET}s)" "$cmd"; return 0
  fi
  # shellcheck disable=SC2086  # MODULES is a list of words
  if ! why=$("$PY" "$TOOLS" check --work "$WORK" $modules 2>&1); then
    echo "skipped: $why"; record "$name" skipped 0 "$t" "$why" "$cmd"; return 0
  fi
  t0=$(date +%s%N)
  timeout -k 10 "$t" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs="$((secs / 1000)).$(printf '%03d' $((secs % 1000)))"
  if (( rc == 124 || rc == 137 )); then
    status=failed; note="timed out after ${t}s"
    [[ $post == - ]] || "$post" "$rc" > /dev/null
  elif [[ $post != - ]]; then
    if note=$("$post" "$rc"); then status=ok; else status=failed; fi
  elif (( rc != 0 )); then
    status=failed
    note="exit $rc: $(grep -iE 'error|exception|killed' "$WORK/$name.log" | tail -n 1 | cut -c1-300)"
  elif [[ -s $OUTDIR/$name.json ]]; then
    status=ok; note=""
  else
    status=failed; note="exited 0 but wrote no $name.json"
  fi
  # a kernel whose compilation failed runs eagerly (ops/compiled.py): the step is still
  # ok, but its "compiled" figures are eager ones, which the note must say
  if grep -q "visionpeft: compiling .* failed" "$WORK/$name.log"; then
    note="${note:+$note; }compiling failed, ran eagerly: $(grep -o -m1 "compiling .* failed ([^)]*" "$WORK/$name.log" \
      | cut -c1-200)"
  fi
  tail -n 12 "$WORK/$name.log" | sed 's/^/  | /'
  echo "--- $name: $status (${secs}s) $note"
  record "$name" "$status" "$secs" "$t" "$note" "$cmd"
}

# shellcheck disable=SC2329  # called through run_step's POST argument
cuda_tests_post() {  # pytest's report as JSON; on the GPU every selected test must pass, none skip
  local flag=()
  (( DRY )) || flag=(--require-pass)
  "$PY" "$TOOLS" junit --xml "$WORK/junit.xml" --out "$OUTDIR/cuda_tests.json" --rc "$1" "${flag[@]}"
}

# the test files that mention CUDA; the plugin in device_tools.py keeps their CUDA tests
mapfile -t CUDA_FILES < <(grep -l -i cuda tests/test_*.py 2>/dev/null)
# the dry run checks this step's plumbing (pytest, the plugin, the JUnit report) on one
# light file: collecting all of them imports gradio, diffusers and open_clip (45 s here)
if (( DRY )) && [[ " ${CUDA_FILES[*]} " == *" tests/test_dwt.py "* ]]; then CUDA_FILES=(tests/test_dwt.py); fi
if (( ${#CUDA_FILES[@]} )); then
  run_step cuda_tests 90 "pytest visionpeft" cuda_tests_post \
    env PYTHONPATH="$ROOT/scripts:$PYTHONPATH" "$PY" -m pytest -q -rA -p no:cacheprovider -p device_tools \
    --junitxml="$WORK/junit.xml" "${CUDA_FILES[@]}"
elif [[ " $WANT " == *" cuda_tests "* ]]; then
  STEPS_LEFT=$((STEPS_LEFT - 1)); record cuda_tests skipped 0 0 "no test file mentions CUDA" "-"
fi

if (( DRY )); then
  # a few variants of each kind: the dry run checks the steps' plumbing and the scripts'
  # options, not every method (the CPU benchmarks and tests do that; CUDA only the GPU can);
  # lora and peft_lora always run, as the ratios' references
  METHODS=(krona wara snell peft_lokr)
  COMPILED=(snell_compiled snella_compiled)
  VIT=(--device cpu --depth 1 --width 64 --img 64 --batch 2 --rounds 1 --warmup 1)
  # inductor's CPU compile takes minutes on 2 cores: the dry run checks the compiled
  # variants' plumbing with torch.compile off (they run eager); the GPU run compiles
  NOCOMPILE=(env TORCH_COMPILE_DISABLE=1)
  DB=(--device cpu --unet toy --resolution 64 --dtype bf16 --rounds 1)
  SW=(--device cpu --unet toy --counts 1 10 --diffusers-counts 1 3 --switches 20)
  # 32 px: the decoder's convolutions at 64 px take most of a minute on 2 cores
  CD=(--device cpu --toy --image-size 32 --batch 2 --rounds 1)
  FS=(--device cpu --quick)
  PTS=(--device cpu --quick)
else
  METHODS=(krona block_lora wara loha snell snella peft_lokr peft_loha peft_waveft)
  COMPILED=(snell snell_compiled snella_compiled)  # eager SNELL beside: the compiled path's gain
  VIT=(--device cuda --depth 12 --batch 32 --rounds 7 --warmup 1)
  NOCOMPILE=()
  DB=(--device cuda --resolution 512 --dtype bf16 --batch 1 --rounds 5)
  # diffusers' add_adapter slows with every adapter loaded (each one costs more than the
  # last): 30 of theirs keeps the step within its minute; ours go to 100
  SW=(--device cuda --counts 1 10 100 --diffusers-counts 1 10 30 --switches 200)
  CD=(--device cuda --image-size 256 --batch 8 --rounds 5)
  FS=(--device cuda --layers 12 --batch 32 --rounds 10)
  PTS=(--device cuda --batch 32 --rounds 10)
fi

run_step methods 120 "visionpeft timm peft" - \
  "$PY" scripts/bench_methods.py --host vit "${VIT[@]}" --threads "$THREADS" --only "${METHODS[@]}" \
  --json "$OUTDIR/methods.json"
run_step methods_compiled 150 "visionpeft timm peft" - \
  "${NOCOMPILE[@]}" "$PY" scripts/bench_methods.py --host vit "${VIT[@]}" --threads "$THREADS" \
  --only "${COMPILED[@]}" --json "$OUTDIR/methods_compiled.json"
run_step dreambooth 120 "visionpeft diffusers peft" - \
  "$PY" scripts/bench_dreambooth.py "${DB[@]}" --threads "$THREADS" --json "$OUTDIR/dreambooth.json"
run_step switch 90 "visionpeft diffusers peft" - \
  "$PY" scripts/bench_switch.py "${SW[@]}" --threads "$THREADS" --json "$OUTDIR/switch.json"
run_step cd 90 "visionpeft timm" - \
  "$PY" scripts/bench_cd.py "${CD[@]}" --threads "$THREADS" --json "$OUTDIR/cd.json"
run_step fewshot 120 "visionpeft open_clip peft" - \
  "$PY" scripts/bench_fewshot.py "${FS[@]}" --threads "$THREADS" --output "$OUTDIR/fewshot.json"
run_step points 120 "visionpeft" - \
  "$PY" scripts/bench_points.py "${PTS[@]}" --threads "$THREADS" --json "$OUTDIR/points.json"

"$PY" "$TOOLS" report --work "$WORK" --outdir "$OUTDIR"
echo "=== done in $(( $(date +%s) - START ))s: $OUTDIR/summary.md"
sed -n '/^## Steps/,/^## Environment/p' "$OUTDIR/summary.md" | head -n -1
exit "$FAILED"
