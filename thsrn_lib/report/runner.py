"""Execute a report plan: every notebook through papermill, then HTML renderings and an index.

Layout of a run (``reports/<name>/`` by default)::

    index.html            links, status and key metrics of every notebook
    report.json           the same, machine-readable
    <nb>.ipynb            the executed notebook (errors included)
    <nb>.html             its nbconvert rendering (code hidden with hide_code)
    <nb>/                 the notebook's own output folder (metrics.json, *.png, ...),
                          passed to it as the parameter ``output_dir``

A notebook that fails still yields its executed notebook and rendering, is marked failed, and
the following notebooks still run. Parameters of *every* notebook are validated before the
first one starts, so a typo in a plan costs nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils.io import atomic_write, atomic_write_json
from .kernel import ensure_kernel, kernel_environment
from .notebook import read_notebook, validate_parameters
from .plan import NotebookSpec, Plan, load_plan
from .render import render_notebook_html, write_index

__all__ = ["NotebookResult", "ReportResult", "run_plan", "key_metrics"]

METRICS_FILE = "metrics.json"


@dataclass
class NotebookResult:
    name: str
    source: Path
    status: str  # "ok" or "failed"
    seconds: float
    parameters: dict[str, Any]
    artifacts_dir: Path
    executed_path: Path | None = None
    html_path: Path | None = None
    error: str | None = None
    artifacts: list[str] = field(default_factory=list)  # paths relative to artifacts_dir
    metrics: dict[str, Any] = field(default_factory=dict)  # key metrics for the index

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": str(self.source), "status": self.status, "error": self.error,
            "seconds": round(self.seconds, 3), "parameters": self.parameters,
            "executed": None if self.executed_path is None else str(self.executed_path),
            "html": None if self.html_path is None else str(self.html_path),
            "artifacts_dir": str(self.artifacts_dir), "artifacts": self.artifacts, "metrics": self.metrics,
        }


@dataclass
class ReportResult:
    name: str
    output_dir: Path
    index_path: Path
    notebooks: list[NotebookResult]
    hide_code: bool = False
    plan_source: Path | None = None

    @property
    def ok(self) -> bool:
        return all(nb.ok for nb in self.notebooks)

    @property
    def failed(self) -> list[NotebookResult]:
        return [nb for nb in self.notebooks if not nb.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "output_dir": str(self.output_dir), "ok": self.ok, "hide_code": self.hide_code,
            "plan": None if self.plan_source is None else str(self.plan_source),
            "python": sys.version.split()[0],
            "notebooks": [nb.to_dict() for nb in self.notebooks],
        }


def key_metrics(metrics: Mapping[str, Any], limit: int = 12) -> dict[str, Any]:
    """The metrics shown in the index: a ``summary`` mapping if the notebook wrote one, else the
    first ``limit`` scalar values, nested keys joined with dots (``i2t.r1``)."""
    source = metrics.get("summary") if isinstance(metrics.get("summary"), Mapping) else metrics
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str, depth: int) -> None:
        for k, v in d.items():
            if len(out) >= limit:
                return
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and depth < 3:
                walk(v, key + ".", depth + 1)
            elif isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 60) or v is None:
                out[key] = v

    walk(source, "", 1)
    return out


def _fresh_artifacts(folder: Path, since: float) -> list[str]:
    """Files written under ``folder`` by this run (older leftovers of a previous run are not linked)."""
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and p.stat().st_mtime >= since:
            found.append(rel.as_posix())
    return found


def _failure_banner(nb, error: str) -> None:
    """Put a visible error cell first when papermill itself did not (kernel death, timeout, ...)."""
    import html

    import nbformat

    if any("papermill-error-cell-tag" in c.metadata.get("tags", []) for c in nb.cells):
        return
    cell = nbformat.v4.new_markdown_cell(
        f'<span style="color:red;font-size:1.5em">This notebook failed:</span>\n\n<pre>{html.escape(error)}</pre>')
    cell.metadata["tags"] = ["thsrn-report-error"]
    nb.cells.insert(0, cell)


def _execute_one(spec: NotebookSpec, nb_source, plan: Plan) -> NotebookResult:
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run_dir = plan.output_dir
    artifacts_dir = run_dir / spec.name
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    params = {**spec.parameters, "output_dir": str(artifacts_dir)}
    result = NotebookResult(name=spec.name, source=spec.path, status="ok", seconds=0.0, parameters=params,
                            artifacts_dir=artifacts_dir)
    started_wall = time.time() - 1.0  # mtime granularity
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="thsrn-report-") as tmp:
        src = Path(tmp) / f"{spec.name}.ipynb"
        out = Path(tmp) / f"{spec.name}.executed.ipynb"
        nb_source = nbformat.from_dict(nb_source)  # a copy: the metadata below is per run
        nb_source.metadata["kernelspec"] = {"name": plan.kernel, "display_name": plan.kernel, "language": "python"}
        nb_source.metadata.setdefault("language_info", {"name": "python"})
        nbformat.write(nb_source, src)
        try:
            with kernel_environment(threads=_kernel_threads(plan.jobs)):
                pm.execute_notebook(
                    str(src), str(out), parameters=params, kernel_name=plan.kernel, language="python",
                    cwd=str(spec.path.parent), progress_bar=False, log_output=False, start_timeout=120,
                    execution_timeout=spec.timeout,
                )
        except PapermillExecutionError as exc:
            result.status = "failed"
            result.error = f"{exc.ename}: {exc.evalue} (cell In [{exc.exec_count}])"
        except Exception as exc:  # kernel death, timeouts, missing kernel: the run goes on
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {exc}".strip()
        executed = nbformat.read(out, as_version=4) if out.is_file() else nbformat.read(src, as_version=4)
    result.seconds = time.monotonic() - t0
    if result.error:
        _failure_banner(executed, result.error)
    executed.metadata.setdefault("papermill", {})
    executed.metadata["papermill"]["input_path"] = str(spec.path)
    result.executed_path = run_dir / f"{spec.name}.ipynb"
    executed.metadata["papermill"]["output_path"] = str(result.executed_path)
    with atomic_write(result.executed_path, "w", encoding="utf-8") as fh:
        nbformat.write(executed, fh)
    try:
        result.html_path = run_dir / f"{spec.name}.html"
        render_notebook_html(executed, result.html_path, hide_code=plan.hide_code)
    except Exception as exc:  # a rendering bug must not hide the executed notebook
        result.html_path = None
        result.status = "failed"
        result.error = (result.error + "; " if result.error else "") + f"HTML rendering failed: {exc}"

    result.artifacts = _fresh_artifacts(artifacts_dir, started_wall)
    if METRICS_FILE in result.artifacts:
        try:
            metrics = json.loads((artifacts_dir / METRICS_FILE).read_text(encoding="utf-8"))
            if not isinstance(metrics, dict):
                raise ValueError("top level is not a JSON object")
            result.metrics = key_metrics(metrics)
        except ValueError as exc:
            result.status = "failed"
            result.error = (result.error + "; " if result.error else "") + f"{METRICS_FILE} unreadable: {exc}"
    return result


def _kernel_threads(jobs: int) -> int | None:
    """CPU threads per kernel when ``jobs`` notebooks share the machine (None: the libraries' default).

    Two kernels each running torch on every core slow each other down several-fold; splitting
    the cores keeps the side-by-side run faster than the sequential one.
    """
    return None if jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)


def _log_done(log: Callable[[str], None], r: NotebookResult) -> None:
    log(f"  {r.name}: {'ok' if r.ok else 'FAILED'} ({r.seconds:.1f} s)" + (f" - {r.error}" if r.error else ""))


def _run_parallel(p: Plan, sources: list, log: Callable[[str], None],
                  done: Callable[[int, NotebookResult], None]) -> None:
    """Execute up to ``p.jobs`` notebooks at a time in worker processes, each once its ``after``
    notebooks have finished (failed ones count as finished: dependents still run and show why)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = list(range(len(p.notebooks)))
    finished: set[str] = set()
    running: dict = {}
    # spawn: a fresh interpreter per worker (no forked copies of this process's threads or torch state).
    with ProcessPoolExecutor(max_workers=p.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for i in [i for i in pending if set(p.notebooks[i].after) <= finished][: p.jobs - len(running)]:
                pending.remove(i)
                spec = p.notebooks[i]
                log(f"[{i + 1}/{len(p.notebooks)}] {spec.name} ({spec.path.name}) started")
                running[pool.submit(_execute_one, spec, sources[i], p)] = i
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in completed:
                i = running.pop(fut)
                spec = p.notebooks[i]
                finished.add(spec.name)
                try:
                    r = fut.result()
                except Exception as exc:  # the worker itself died: report it, go on with the others
                    r = NotebookResult(name=spec.name, source=spec.path, status="failed", seconds=0.0,
                                       parameters=spec.parameters, artifacts_dir=p.output_dir / spec.name,
                                       error=f"worker process failed: {type(exc).__name__}: {exc}")
                done(i, r)


def _finite(obj: Any) -> Any:
    """JSON-safe copy (NaN/inf become None so report.json stays strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_plan(
    plan: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    hide_code: bool | None = None,
    only: list[str] | tuple[str, ...] | None = None,
    extra_parameters: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    jobs: int | None = None,
) -> ReportResult:
    """Execute every notebook of ``plan`` and write the report; see the module docstring.

    ``jobs`` (default: the plan's ``jobs``, else 1) notebooks run at the same time, each in its
    own worker process and kernel, with the CPU cores split between the kernels.

    Raises :class:`ConfigError` (before anything runs) for a malformed plan, a notebook without
    exactly one ``parameters`` cell, or a parameter the notebook does not declare. Notebook
    failures do not raise: check ``result.ok`` / ``result.failed``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = load_plan(plan, output_dir=output_dir, hide_code=hide_code, only=only, extra_parameters=extra_parameters,
                  jobs=jobs)
    p = replace(p, jobs=min(p.jobs, len(p.notebooks)))  # never split the cores for jobs that cannot run
    sources = []
    for spec in p.notebooks:
        nb = read_notebook(spec.path)
        validate_parameters(nb, spec.parameters, spec.path)
        sources.append(nb)
    ensure_kernel(p.kernel)
    if p.output_dir.exists() and not p.output_dir.is_dir():
        raise ConfigError(f"report output {p.output_dir} exists and is not a folder; choose another --output-dir")
    p.output_dir.mkdir(parents=True, exist_ok=True)

    result = ReportResult(name=p.name, output_dir=p.output_dir, index_path=p.output_dir / "index.html",
                          notebooks=[], hide_code=p.hide_code, plan_source=p.source)
    log(f"report {p.name!r}: {len(p.notebooks)} notebook(s) -> {p.output_dir}"
        + (f", {p.jobs} at a time" if p.jobs > 1 else ""))
    slots: list[NotebookResult | None] = [None] * len(p.notebooks)

    def done(i: int, r: NotebookResult) -> None:
        _log_done(log, r)
        slots[i] = r
        # Refresh the index after every notebook so a long run can be followed in a browser.
        result.notebooks = [x for x in slots if x is not None]  # plan order
        atomic_write_json(p.output_dir / "report.json", _finite(result.to_dict()))
        write_index(result, result.index_path)

    if p.jobs > 1:
        _run_parallel(p, sources, log, done)
    else:
        for i, (spec, nb) in enumerate(zip(p.notebooks, sources)):
            log(f"[{i + 1}/{len(p.notebooks)}] {spec.name} ({spec.path.name})")
            done(i, _execute_one(spec, nb, p))
    log(f"report written to {result.index_path}" + ("" if result.ok else f" ({len(result.failed)} failed)"))
    return result
