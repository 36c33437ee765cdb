#!/usr/bin/env bash
# The main job on the embedded default: set up (scripts/setup.sh), then MeZO fine-tuning of the
# packaged MiniLM encoder on word polarity from the vaderSentiment lexicon. Arguments go to
# `python -m fastmezo finetune` (default here: --quick, a few minutes on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- --quick
fi
exec python -m fastmezo finetune "$@"
