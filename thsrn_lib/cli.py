"""The ``thsrn`` command: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this module only dispatches (imports are lazy so ``thsrn --help`` is fast).
Library errors (:class:`~thsrn_lib.errors.ThsrnError`) are printed as one clear message with a
non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import ThsrnError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scenes": ("thsrn_lib.data.scenes.cli", "generate the synthetic Scenes benchmark (SCAN precomp layout)"),
    "train": ("thsrn_lib.train.cli", "train a model from a YAML recipe"),
    "eval": ("thsrn_lib.evaluation.cli", "evaluate checkpoints under a retrieval protocol"),
    "report": ("thsrn_lib.report", "execute a plan of notebooks into an HTML report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thsrn",
        description="thsrn-workbench: image-text matching models, data, training, evaluation and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return parser


def _lazy_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    # Only import the module of the subcommand asked for (torch-heavy modules stay unloaded for --help).
    if argv and argv[0] in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog="thsrn")
        sub = parser.add_subparsers(dest="command")
        module, help_text = SUBCOMMANDS[argv[0]]
        sp = sub.add_parser(argv[0], help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
        return parser
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _lazy_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except ThsrnError as exc:
        print(f"thsrn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thsrn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
