#!/usr/bin/env bash
# The main job on the embedded default: set up (scripts/setup.sh), then the MeZO paper's comparison
# (zero-shot, linear probing, MeZO full / LoRA / prefix / 0-1 loss, backprop + Adam) fine-tuning the
# packaged MiniLM encoder on word polarity from the vaderSentiment lexicon: accuracy, peak memory and
# time per method, as a table and a plot in runs/finetune/. Arguments go to
# `python -m fastmezo finetune` (see its --help). The quick setting (the whole grid in a few minutes
# on a 2-core CPU) is added unless the arguments say --quick or --full, so that
# `finetune.sh --methods mezo` stays quick; on a GPU, pass --full for k=512 and 5000 MeZO steps.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
setting=--quick
for arg in "$@"; do
  case "$arg" in
    --quick | --full) setting= ;;
  esac
done
exec python -m fastmezo finetune ${setting:+"$setting"} "$@"
