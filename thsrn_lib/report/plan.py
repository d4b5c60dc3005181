"""Report plans: which notebooks to execute, with which parameters, into which folder.

A plan is a YAML file (or the equivalent dict)::

    name: demo                      # run name; the report goes to reports/<name>/ by default
    output_dir: reports/demo        # optional
    hide_code: false                # HTML renderings without the code cells
    kernel: thsrn                   # optional Jupyter kernel name (default: the project kernel)
    jobs: 2                         # optional, notebooks executed at the same time (default 1)
    defaults: {smoke: false}        # parameters given to every notebook
    notebooks:
      - path: notebooks/00_quickstart.py
        name: quickstart            # optional, default: the file stem
        parameters: {train_seconds: 120}
        timeout: 900                # optional, seconds per cell
      - path: notebooks/03_evaluate.py
        after: [quickstart]         # optional, notebooks that must finish first

Relative paths (``output_dir``, ``path``) are resolved against the current working directory,
like the ``--plan`` argument itself. In parameter values, the tokens ``{run_dir}`` (the absolute
report folder) and ``{plan_dir}`` (the folder holding the plan file) are substituted, so that one
notebook can consume another's artifacts (e.g. ``{run_dir}/02_train/checkpoint.pt``).

With ``jobs`` > 1 independent notebooks run side by side. A notebook starts only after the
notebooks named in its ``after`` list and those whose folder its parameters mention
(``{run_dir}/<name>``); both must come earlier in the plan, so the order is always valid.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["NotebookSpec", "Plan", "load_plan", "DEFAULT_KERNEL"]

DEFAULT_KERNEL = "thsrn"
_PLAN_KEYS = {"name", "output_dir", "defaults", "hide_code", "notebooks", "kernel", "jobs"}
_NB_KEYS = {"path", "name", "parameters", "timeout", "after"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Parameters the runner sets itself; a plan may not set them.
RESERVED_PARAMETERS = frozenset({"output_dir"})


@dataclass(frozen=True)
class NotebookSpec:
    """One notebook of a plan; ``parameters`` already include the plan's defaults."""

    path: Path
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    after: tuple[str, ...] = ()  # names of earlier notebooks that must finish before this one starts


@dataclass(frozen=True)
class Plan:
    name: str
    output_dir: Path
    notebooks: tuple[NotebookSpec, ...]
    hide_code: bool = False
    kernel: str = DEFAULT_KERNEL
    source: Path | None = None  # the plan file, if the plan came from one
    jobs: int = 1  # notebooks executed at the same time


def _check_keys(d: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def _substitute(value: Any, tokens: Mapping[str, str]) -> Any:
    """Replace ``{run_dir}``-style tokens inside (nested) string values."""
    if isinstance(value, str):
        for token, repl in tokens.items():
            value = value.replace("{" + token + "}", repl)
        return value
    if isinstance(value, list):
        return [_substitute(v, tokens) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, tokens) for k, v in value.items()}
    return value


_RUN_DIR_REF = re.compile(r"\{run_dir\}[/\\]([A-Za-z0-9][A-Za-z0-9_.-]*)")


def _run_dir_names(value: Any) -> set[str]:
    """Folder names ``X`` of every ``{run_dir}/X`` in the (nested) strings of ``value``."""
    if isinstance(value, str):
        return set(_RUN_DIR_REF.findall(value))
    items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
    return set().union(*(_run_dir_names(v) for v in items))


def _check_jobs(jobs: Any, where: str) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"{where}: 'jobs' must be a whole number >= 1 (notebooks run at the same time), got {jobs!r}")
    return jobs


def _resolve(path: str | os.PathLike, base: Path) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    return (p if p.is_absolute() else base / p).resolve()


def load_plan(
    plan: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    hide_code: bool | None = None,
    only: list[str] | tuple[str, ...] | None = None,
    extra_parameters: Mapping[str, Any] | None = None,
    jobs: int | None = None,
) -> Plan:
    """Read and check a plan (a YAML path or a dict); CLI-style overrides win over the file.

    ``only`` keeps the named notebooks (by name or file stem), in plan order;
    ``extra_parameters`` are added to every notebook (after the plan's defaults and its own).
    Dependencies on notebooks left out by ``only`` are dropped (their earlier output is used).
    Raises :class:`ConfigError` for any malformed entry, naming the plan file.
    """
    source: Path | None = None
    if isinstance(plan, Mapping):
        raw: Any = dict(plan)
        where = "report plan"
        plan_dir = Path.cwd()
    else:
        source = Path(plan).resolve()
        where = f"report plan {source}"
        if not source.is_file():
            raise ConfigError(f"{where}: file not found (pass --plan path/to/plan.yaml)")
        import yaml

        try:
            raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
        plan_dir = source.parent
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'name' and 'notebooks', got {type(raw).__name__}")
    _check_keys(raw, _PLAN_KEYS, where)

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must be a simple run name (letters, digits, '_', '-', '.'), got {name!r}")
    cwd = Path.cwd()
    out = output_dir if output_dir is not None else raw.get("output_dir") or Path("reports") / name
    out_path = _resolve(out, cwd)

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{where}: 'defaults' must be a mapping of parameter names to values")
    hide = raw.get("hide_code", False) if hide_code is None else hide_code
    if not isinstance(hide, bool):
        raise ConfigError(f"{where}: 'hide_code' must be true or false, got {hide!r}")
    kernel = raw.get("kernel", DEFAULT_KERNEL)
    if not isinstance(kernel, str) or not kernel:
        raise ConfigError(f"{where}: 'kernel' must be a kernel name such as {DEFAULT_KERNEL!r}")

    n_jobs = _check_jobs(raw.get("jobs", 1) if jobs is None else jobs,
                         where if jobs is None else "--jobs")

    entries = raw.get("notebooks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'notebooks' must be a non-empty list of {{path, parameters}} entries")
    tokens = {"run_dir": str(out_path), "plan_dir": str(plan_dir)}
    specs: list[NotebookSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        ewhere = f"{where}: notebooks[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ConfigError(f"{ewhere}: each entry needs at least 'path' (a notebooks/*.py file)")
        _check_keys(entry, _NB_KEYS, ewhere)
        path = _resolve(entry["path"], cwd)
        if not path.is_file():
            raise ConfigError(f"{ewhere}: notebook {path} not found (paths are relative to the current directory)")
        nb_name = entry.get("name") or path.stem
        if not isinstance(nb_name, str) or not _NAME_RE.match(nb_name):
            raise ConfigError(f"{ewhere}: 'name' must be a simple name usable as a folder, got {nb_name!r}")
        if nb_name in seen:
            raise ConfigError(f"{ewhere}: duplicate notebook name {nb_name!r}; give one entry a distinct 'name'")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{ewhere}: 'parameters' must be a mapping")
        merged = {**defaults, **params, **(extra_parameters or {})}
        after = entry.get("after") or []
        if isinstance(after, str):
            after = [after]
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise ConfigError(f"{ewhere}: 'after' must be a list of notebook names")
        later = [a for a in after if a not in seen]
        if later:
            raise ConfigError(f"{ewhere}: 'after' names {later}, which are not earlier notebooks of the plan "
                              f"(earlier: {sorted(seen)}); a notebook can only wait for one listed before it")
        # Reading another notebook's folder ({run_dir}/<name>) makes it a dependency too.
        implied = sorted(_run_dir_names(merged) & seen)
        seen.add(nb_name)
        reserved = sorted(RESERVED_PARAMETERS & set(merged))
        if reserved:
            raise ConfigError(f"{ewhere}: parameter(s) {reserved} are set by the runner (each notebook writes to "
                              f"<output_dir>/<name>/); remove them from the plan")
        timeout = entry.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConfigError(f"{ewhere}: 'timeout' must be a positive number of seconds, got {timeout!r}")
        specs.append(NotebookSpec(path=path, name=nb_name, parameters=_substitute(merged, tokens),
                                  timeout=None if timeout is None else float(timeout),
                                  after=tuple(dict.fromkeys([*after, *implied]))))

    if only:
        wanted = list(dict.fromkeys(only))
        known = {s.name for s in specs} | {s.path.stem for s in specs}
        missing = [w for w in wanted if w not in known]
        if missing:
            raise ConfigError(f"{where}: --only names {missing} are not in the plan; available: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted or s.path.stem in wanted]
        kept = {s.name for s in specs}
        specs = [replace(s, after=tuple(a for a in s.after if a in kept)) for s in specs]

    return Plan(name=name, output_dir=out_path, notebooks=tuple(specs), hide_code=hide, kernel=kernel, source=source,
                jobs=n_jobs)
