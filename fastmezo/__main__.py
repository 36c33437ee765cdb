"""Command line: ``python -m fastmezo <command> [options]`` (also the ``fastmezo`` console script).

Commands:
  finetune   the MeZO paper's comparison (zero-shot, in-context learning, linear probing, MeZO full /
             LoRA / prefix / non-differentiable, backprop + Adam) fine-tuning the causal LM
             SmolLM2-135M on tweet sentiment, prompt-based as in the paper (the quick setting runs
             the grid in minutes on a small CPU), or, with ``--task vader``, all-MiniLM-L6-v2 on VADER
             word polarity; under torchrun the MeZO methods run data-parallel
  replay     BASE TRAJECTORY OUT: fine-tuned weights (safetensors) from base weights and a trajectory

SIGINT and SIGTERM stop a command within seconds with one line on stderr and the exit status 130 /
143 (128 + the signal's number); the handlers are installed before the command's imports
(transformers, peft) and its work.
"""
from __future__ import annotations

import argparse
import sys

from .apps.isolation import Interrupted, stop_on_signals


def build_parser() -> argparse.ArgumentParser:
    """The ``fastmezo`` parser, one subcommand per app."""
    from .apps import cli, finetune  # imports torch; fine for a command line that trains models

    parser = argparse.ArgumentParser(prog="fastmezo", description="fastmezo: fused kernels for MeZO.",
                                     epilog="Run 'fastmezo <command> --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    sub = commands.add_parser("finetune", help="MeZO vs baselines: SmolLM2 on tweets, or MiniLM on word polarity",
                              description=cli.DESCRIPTION, formatter_class=cli.HelpFormatter)
    cli.build_parser(sub)
    sub.set_defaults(func=finetune.run)
    from . import replayer
    replayer.add_command(commands)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the command, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and not argv[0].startswith("-") else "fastmezo"
    with stop_on_signals():
        try:
            return _run(argv)
        except Interrupted as exc:  # one line, no traceback; the command has cleaned up
            note = getattr(exc, "note", "")
            print(f"fastmezo {name}: stopped by {exc.signal_name}" + (f"; {note}" if note else ""),
                  file=sys.stderr, flush=True)
            return exc.exit_code


def _run(argv) -> int:
    from .apps.finetune import RunFailed
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the command's own options, recorded in its outputs
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RunFailed) as exc:  # bad input: one clear line, no traceback
        raise SystemExit(f"fastmezo {args.command}: error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
