#!/usr/bin/env bash
# The main job on the embedded default: set up (scripts/setup.sh), then the MeZO paper's comparison
# (zero-shot, linear probing, MeZO full / LoRA / prefix / 0-1 loss, backprop + Adam) fine-tuning the
# packaged MiniLM encoder on word polarity from the vaderSentiment lexicon: accuracy, peak memory and
# time per method, as a table and a plot in runs/finetune/. Arguments go to
# `python -m fastmezo finetune` (default here: --quick, the whole grid in a few minutes on a 2-core
# CPU; on a GPU, no --quick: k=512 and 5000 MeZO steps per method).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- --quick
fi
exec python -m fastmezo finetune "$@"
