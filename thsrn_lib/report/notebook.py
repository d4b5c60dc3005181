"""Jupytext notebooks as the runner sees them: conversion, the ``parameters`` cell, validation.

Notebooks live in git as jupytext percent-format ``.py`` files. The runner converts them in
memory (never writing an ``.ipynb`` next to the source) and reads the parameters declared in
the single cell tagged ``parameters`` (papermill's convention) so that a plan's parameters can
be checked *before* a kernel starts.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["read_notebook", "parameter_cells", "declared_parameters", "validate_parameters"]


def read_notebook(path: str | Path):
    """Read a notebook source (jupytext ``.py`` percent file or ``.ipynb``) as an nbformat v4 node."""
    import jupytext
    import nbformat

    path = Path(path)
    try:
        if path.suffix == ".ipynb":
            nb = nbformat.read(path, as_version=4)
        else:
            nb = jupytext.read(path, fmt="py:percent")
    except Exception as exc:  # jupytext/nbformat raise many types; the user needs the file name
        raise ConfigError(f"notebook {path}: cannot be read as a jupytext percent notebook: {exc}") from exc
    return nb


def parameter_cells(nb) -> list[int]:
    """Indices of the code cells tagged ``parameters``."""
    return [i for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])]


def declared_parameters(nb, path: str | Path = "<notebook>") -> dict[str, dict[str, Any]]:
    """Parameters declared by the notebook's single ``parameters`` cell.

    Returns ``{name: {"inferred_type_name", "default", "help"}}`` (papermill's inspection, which
    reads ``name: type = default  # help`` lines). Raises :class:`ConfigError` if the notebook has
    no ``parameters`` cell or more than one.
    """
    from papermill.translators import papermill_translators

    cells = parameter_cells(nb)
    if len(cells) != 1:
        what = "no cell" if not cells else f"{len(cells)} cells"
        raise ConfigError(
            f"notebook {path}: has {what} tagged 'parameters'; it needs exactly one "
            f"(in a jupytext percent file: a cell starting with  # %% tags=[\"parameters\"])"
        )
    cell = nb.cells[cells[0]]
    translator = papermill_translators.find_translator("python3", "python")
    params = {p.name: p._asdict() for p in translator.inspect(cell)}
    # Papermill's line parser silently skips some valid Python (e.g. a second '=' in a help
    # comment); compare with what Python itself assigns so that no parameter goes unnoticed.
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as exc:
        raise ConfigError(f"notebook {path}: the parameters cell is not valid Python (line {exc.lineno}: {exc.msg})") from None
    assigned: dict[str, int] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                assigned.setdefault(t.id, node.lineno)
    missed = {n: line for n, line in assigned.items() if n not in params}
    if missed:
        where = ", ".join(f"{n!r} (line {line} of the cell)" for n, line in missed.items())
        raise ConfigError(f"notebook {path}: papermill cannot read parameter(s) {where} of the parameters cell; "
                          "write one 'name: type = value  # help' per line, with no second '=' (not even in "
                          "the comment)")
    return params


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "list": (list,),
    "dict": (dict,),
}


def _type_ok(value: Any, type_name: str, default: str) -> bool:
    """Whether ``value`` fits an annotation papermill reported (unknown annotations accept anything)."""
    t = type_name.replace(" ", "")
    if value is None:
        return default.strip() == "None" or "None" in t or "Optional" in t or t == "None"
    base = re.split(r"[\[|]", t, maxsplit=1)[0].lower()
    if base not in _SIMPLE_TYPES:
        return True
    if isinstance(value, bool) and base in ("int", "float"):
        return False
    return isinstance(value, _SIMPLE_TYPES[base])


def validate_parameters(nb, parameters: Mapping[str, Any], path: str | Path = "<notebook>",
                        runner_parameters: tuple[str, ...] = ("output_dir",)) -> dict[str, dict[str, Any]]:
    """Check ``parameters`` against the notebook's declaration; return the declaration.

    Unknown names and values whose type contradicts an annotation (``epochs: int = 3``) raise
    :class:`ConfigError` naming the notebook and listing the valid parameters. The names in
    ``runner_parameters`` must be declared too, because the runner always passes them.
    """
    declared = declared_parameters(nb, path)
    valid = ", ".join(f"{n}: {d['inferred_type_name']} = {d['default']}" for n, d in declared.items())
    missing_runner = [n for n in runner_parameters if n not in declared]
    if missing_runner:
        raise ConfigError(f"notebook {path}: its parameters cell must declare {missing_runner} "
                          f"(the report runner passes them); declared: {valid or 'nothing'}")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ConfigError(f"notebook {path}: unknown parameter(s) {unknown}; valid parameters are: {valid}")
    for name, value in parameters.items():
        d = declared[name]
        if not _type_ok(value, d["inferred_type_name"], d["default"]):
            raise ConfigError(f"notebook {path}: parameter {name!r} expects {d['inferred_type_name']} "
                              f"(default {d['default']}), got {value!r}")
    return declared


def _committable(folder: Path, paths: list[Path]) -> list[Path]:
    """The subset of ``paths`` that git tracks or would add (not ignored); all of them outside a
    git work tree. Read-only git query: ``git ls-files --cached --others --exclude-standard``."""
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
                             cwd=folder, capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return paths
    listed = {(folder / p).resolve() for p in out.decode("utf-8", "replace").split("\0") if p}
    return [p for p in paths if p.resolve() in listed]


def lint_notebook_sources(folder: str | Path, required: tuple[str, ...] = ("output_dir", "smoke")) -> list[str]:
    """Problems with the notebook sources under ``folder`` (empty list = clean).

    - every ``*.py`` (jupytext percent) has exactly one ``parameters`` cell that declares the
      ``required`` names and documents each parameter with a type annotation and a comment;
    - no ``.ipynb`` that is (or would be) committed sits next to them, outputs or not: sources are
      ``.py`` only and executed notebooks belong under ``reports/``. Inside a git work tree a
      git-ignored local ``.ipynb`` is tolerated; Jupyter's ``.ipynb_checkpoints`` always are.
    """
    import nbformat

    folder = Path(folder)
    problems: list[str] = []
    stray = [p for p in sorted(folder.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts]
    for path in _committable(folder, stray):
        try:
            nb = nbformat.read(path, as_version=4)
            n_out = sum(len(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
        except Exception:  # unreadable is as bad as executed
            n_out = -1
        what = "with outputs" if n_out > 0 else ("unreadable" if n_out < 0 else "without outputs")
        problems.append(f"{path}: stray .ipynb ({what}); notebooks live as jupytext .py files, executed "
                        f"copies only under reports/ - delete it")
    for path in sorted(folder.glob("*.py")):
        try:
            declared = declared_parameters(read_notebook(path), path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        for name in required:
            if name not in declared:
                problems.append(f"notebook {path}: the parameters cell must declare {name!r}")
        for name, d in declared.items():
            if d["inferred_type_name"] in ("None", "") or not d["help"].strip():
                problems.append(f"notebook {path}: parameter {name!r} needs a type annotation and a comment "
                                f"(e.g.  {name}: int = 3  # what it does)")
    return problems
