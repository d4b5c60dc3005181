"""``python -m thsrn_lib.data.scenes ...``: the ``thsrn scenes`` subcommand on its own."""
from __future__ import annotations

import argparse
import sys

from thsrn_lib.data.scenes.cli import add_arguments, main
from thsrn_lib.errors import ThsrnError


def _run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thsrn_lib.data.scenes",
                                     description="Generate the synthetic Scenes benchmark (SCAN precomp layout).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except ThsrnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_run())
