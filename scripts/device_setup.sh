# Set up a GPU machine without network for `python -m fastmezo finetune` and bench/bf16_proof.py, from
# the .device-assets/ folder that scripts/pack_device_assets.py writes (carried there with
# carry=[".device-assets"]):
#   1. pip install --no-deps each carried wheel (.device-assets/wheels: peft, accelerate, psutil, tqdm)
#      whose module does not import yet; a failure is reported, not fatal;
#   2. pip install --no-deps --no-build-isolation -e . (fastmezo itself: the Triton kernels live in
#      kernels/, installed as fastmezo.kernels, so a bare PYTHONPATH checkout has NO kernels and every
#      pass falls back to the slow torch oracle; FASTMEZO_NO_NATIVE=1 by default here to save the
#      ~35 s native build, set FASTMEZO_NO_NATIVE=0 to build it);
#   3. export FASTMEZO_MODEL (the float16 MiniLM folder, upcast to float32 by the apps),
#      FASTMEZO_VADER_LEXICON (VADER's lexicon file), HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1;
#   4. check that torch sees CUDA and that transformers, peft, the Triton kernels and the model load.
#
# Then, on an H200 (grid A about 4 min, grid B 4 min, the bf16 proof 1-2 min per configuration; results of
# 2026-11-29 in bench/results/h200-2026-11-29-*):
#   python3 -m fastmezo finetune --device cuda --model .device-assets/minilm-fp16 \
#     --lexicon .device-assets/vader_lexicon.txt --methods zero-shot,linear-probe,mezo,mezo-nondiff,ft-adam \
#     --no-progress --out $OUT/finetune-full-a
#   python3 -m fastmezo finetune ... --methods mezo-lora,mezo-prefix --out $OUT/finetune-full-b
#   python3 bench/bf16_proof.py --device cuda --trainable all --k 512 --steps 1500 --lr 5e-5 --seeds 0,1,2 \
#     --eval-every 250 --dev-limit 0 --tail 100 --model .device-assets/minilm-fp16 \
#     --lexicon .device-assets/vader_lexicon.txt --out $OUT/bf16-proof
#
#   bash scripts/device_setup.sh                 # install + check (the exports end with that shell)
#   source scripts/device_setup.sh && python ... # install + check + exports in this shell
#
# Idempotent and quick once done (a few seconds); the apps' --model/--lexicon options do the same as
# the exports, so commands that pass them need only the install.

_fm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_fm_assets="${FASTMEZO_ASSETS:-$_fm_root/.device-assets}"
_fm_py="${PYTHON:-python3}"

if [ ! -d "$_fm_assets" ]; then
  echo "device_setup: $_fm_assets is missing: run scripts/pack_device_assets.py where the packages are, and carry .device-assets" >&2
else
  if [ -f "$_fm_assets/wheels/modules.txt" ]; then
    while read -r _fm_dist _fm_mod; do
      [ -n "$_fm_dist" ] || continue
      if "$_fm_py" -c "import $_fm_mod" >/dev/null 2>&1; then
        echo "device_setup: $_fm_dist already importable ($("$_fm_py" -c "import importlib.metadata as m; print(m.version('$_fm_dist'))" 2>/dev/null))"
        continue
      fi
      _fm_whl=$(ls "$_fm_assets"/wheels/"$_fm_dist"-*.whl 2>/dev/null | head -1)
      if [ -z "$_fm_whl" ]; then
        echo "device_setup: no wheel for $_fm_dist in $_fm_assets/wheels" >&2
        continue
      fi
      if "$_fm_py" -m pip install --no-deps --no-index --disable-pip-version-check -q "$_fm_whl" \
         || "$_fm_py" -m pip install --no-deps --no-index --disable-pip-version-check -q --user "$_fm_whl"; then
        echo "device_setup: installed $(basename "$_fm_whl")"
      else
        echo "device_setup: could not install $(basename "$_fm_whl") (ignored)" >&2
      fi
    done < "$_fm_assets/wheels/modules.txt"
  else
    echo "device_setup: no carried wheels ($_fm_assets/wheels/modules.txt missing)" >&2
  fi
  export FASTMEZO_MODEL="$_fm_assets/minilm-fp16"
  export FASTMEZO_VADER_LEXICON="$_fm_assets/vader_lexicon.txt"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
(cd "$_fm_root" && FASTMEZO_NO_NATIVE="${FASTMEZO_NO_NATIVE:-1}" "$_fm_py" -m pip install -q --no-deps \
   --no-build-isolation --disable-pip-version-check -e . >/dev/null 2>&1) \
  || echo "device_setup: pip install -e . failed: fastmezo would run without its kernels" >&2

(cd "$_fm_root" && "$_fm_py" - <<'EOF'
import importlib, os
import torch
print(f"device_setup: torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
for mod in ("transformers", "safetensors", "peft", "accelerate", "tqdm", "matplotlib", "fastmezo",
            "fastmezo.kernels"):
    try:
        m = importlib.import_module(mod)
        print(f"device_setup: {mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # report only: the apps say what they miss
        print(f"device_setup: {mod} NOT importable ({type(exc).__name__}: {exc})"
              + (" - plots will be skipped" if mod == "matplotlib" else ""))
try:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model  # noqa: F401  (what mezo-lora/-prefix use)
except Exception as exc:
    print(f"device_setup: peft's LoRA / prefix tuning NOT usable ({type(exc).__name__}: {exc})")
model = os.environ.get("FASTMEZO_MODEL")
if model and os.path.isdir(model):
    from fastmezo.apps.prompt_model import PromptClassifier, load_encoder
    enc, tok = load_encoder(model, "cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        e = PromptClassifier(enc, tok).embed(['The word "good"'])
    print(f"device_setup: model {model}: {sum(p.numel() for p in enc.parameters()):,} weights, "
          f"{next(enc.parameters()).dtype} on {e.device}, embedding norm {float(e.norm()):.4f}")
lex = os.environ.get("FASTMEZO_VADER_LEXICON")
if lex:
    from fastmezo.tasks import vader_polarity
    vader_polarity.build(path=lex)
EOF
) || echo "device_setup: the check failed (see above)" >&2
unset _fm_root _fm_assets _fm_py _fm_dist _fm_mod _fm_whl
true
