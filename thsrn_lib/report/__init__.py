"""Batch execution of notebooks into HTML reports (``thsrn report --plan reports/plans/demo.yaml``).

- :mod:`.plan`: the YAML plan format and its checks.
- :mod:`.notebook`: jupytext conversion and validation of the ``parameters`` cell.
- :mod:`.kernel`: the ``thsrn`` Jupyter kernel and the environment it starts in.
- :mod:`.runner`: :func:`run_plan`, which executes the notebooks through papermill.
- :mod:`.render`: nbconvert HTML renderings and the run's ``index.html``.

Heavy imports (papermill, nbconvert) happen inside the functions, so importing this package
for ``thsrn --help`` stays cheap.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from ..utils.argtypes import positive_int
from .plan import Plan, load_plan
from .runner import NotebookResult, ReportResult, key_metrics, run_plan

__all__ = ["run_plan", "load_plan", "Plan", "ReportResult", "NotebookResult", "key_metrics",
           "add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="YAML plan (e.g. reports/plans/demo.yaml)")
    parser.add_argument("--output-dir", default=None, help="report folder (default: the plan's output_dir, "
                        "else reports/<plan name>)")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--hide-code", dest="hide_code", action="store_true", default=None,
                      help="HTML renderings without code cells (markdown, outputs and figures stay)")
    code.add_argument("--show-code", dest="hide_code", action="store_false", help="keep code cells in the HTML")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only this notebook (name or file stem); repeatable")
    parser.add_argument("-j", "--jobs", type=positive_int, default=None, metavar="N",
                        help="notebooks executed at the same time, the CPU cores split between them (default: the "
                        "plan's 'jobs', else 1); a notebook still waits for those it depends on")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter for every notebook (VALUE parsed as YAML, e.g. -p smoke=true); repeatable")


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE (e.g. -p smoke=true)")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


def main(args: argparse.Namespace) -> int:
    result = run_plan(args.plan, output_dir=args.output_dir, hide_code=args.hide_code, only=args.only,
                      extra_parameters=_parse_params(args.param), jobs=args.jobs)
    print(result.index_path)
    return 0 if result.ok else 1
