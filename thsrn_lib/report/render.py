"""HTML output of a report: one nbconvert rendering per notebook and an ``index.html``."""
from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..utils.io import atomic_write

if TYPE_CHECKING:
    from .runner import ReportResult

__all__ = ["render_notebook_html", "write_index"]


def render_notebook_html(nb, path: str | os.PathLike, hide_code: bool = False) -> None:
    """Render an executed notebook to a standalone HTML file (images embedded).

    ``hide_code`` drops code *inputs* and prompts (nbconvert's no-input mode); markdown, outputs,
    figures and error tracebacks stay. Papermill's ``report_mode`` only sets a Jupyter metadata
    flag that nbconvert ignores, hence the exporter options here.
    """
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=hide_code, exclude_input_prompt=hide_code,
                            exclude_output_prompt=hide_code)
    body, _ = exporter.from_notebook_node(nb)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(body)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;color:#222}
h1{margin-bottom:.2em} .meta{color:#666;margin-bottom:1.5em}
table{border-collapse:collapse;width:100%} th,td{border:1px solid #ddd;padding:.45em .6em;vertical-align:top;text-align:left}
th{background:#f4f4f4} .status{font-weight:bold;white-space:nowrap}
tr.ok .status{color:#18794e} tr.failed{background:#fff3f3} tr.failed .status{color:#c62828}
pre.error{white-space:pre-wrap;color:#c62828;margin:.4em 0 0;font-size:.85em}
.metrics td{border:none;padding:.05em .5em .05em 0;font-size:.9em} .thumbs img{max-height:90px;margin:2px;border:1px solid #ccc}
ul.artifacts{margin:0;padding-left:1.1em;font-size:.9em}
"""


def _href(target: Path, base: Path) -> str:
    return quote(os.path.relpath(target, base).replace(os.sep, "/"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_index(result: ReportResult, path: str | os.PathLike) -> None:
    """Write ``index.html``: status, time, links and key metrics of every notebook of the run."""
    path = Path(path)
    base = path.parent
    n_failed = sum(nb.status != "ok" for nb in result.notebooks)
    summary = "all notebooks ran" if not n_failed else f"{n_failed} of {len(result.notebooks)} notebook(s) FAILED"
    rows = []
    for nb in result.notebooks:
        links = []
        if nb.html_path and nb.html_path.is_file():
            links.append(f'<a href="{_href(nb.html_path, base)}">HTML</a>')
        if nb.executed_path and nb.executed_path.is_file():
            links.append(f'<a href="{_href(nb.executed_path, base)}">notebook (.ipynb)</a>')
        status = "ok" if nb.status == "ok" else "FAILED"
        error = f'<pre class="error">{html.escape(nb.error)}</pre>' if nb.error else ""
        thumbs = "".join(
            f'<a href="{_href(nb.artifacts_dir / a, base)}"><img src="{_href(nb.artifacts_dir / a, base)}" alt="{html.escape(a)}"></a>'
            for a in nb.artifacts if a.lower().endswith(".png") and "/" not in a
        )
        # Top-level files one by one; nested ones (training runs, ...) summarised per folder.
        top = [a for a in nb.artifacts if "/" not in a]
        folders: dict[str, int] = {}
        for a in nb.artifacts:
            if "/" in a:
                folders[a.split("/", 1)[0]] = folders.get(a.split("/", 1)[0], 0) + 1
        others = "".join(
            f'<li><a href="{_href(nb.artifacts_dir / a, base)}">{html.escape(a)}</a></li>' for a in top
        ) + "".join(
            f'<li><a href="{_href(nb.artifacts_dir / d, base)}/">{html.escape(d)}/</a> ({n} file{"s" if n != 1 else ""})</li>'
            for d, n in folders.items()
        )
        artifacts = (f'<div class="thumbs">{thumbs}</div>' if thumbs else "") + (
            f'<ul class="artifacts">{others}</ul>' if others else "<em>none</em>")
        metrics = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                          for k, v in nb.metrics.items())
        metrics_html = f'<table class="metrics">{metrics}</table>' if metrics else "<em>none</em>"
        rows.append(
            f'<tr class="{"ok" if nb.status == "ok" else "failed"}" id="nb-{html.escape(nb.name)}">'
            f"<td><strong>{html.escape(nb.name)}</strong><br><small>{html.escape(nb.source.name)}</small></td>"
            f'<td class="status" data-status="{html.escape(nb.status)}">{status}{error}</td>'
            f"<td>{nb.seconds:.1f} s</td><td>{' | '.join(links) or '<em>no output</em>'}</td>"
            f"<td>{artifacts}</td><td>{metrics_html}</td></tr>"
        )
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>thsrn report: {html.escape(result.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Report: {html.escape(result.name)}</h1>"
        f'<div class="meta">{html.escape(summary)} &middot; {html.escape(when)} &middot; '
        f'<a href="report.json">report.json</a></div>'
        "<table><thead><tr><th>notebook</th><th>status</th><th>time</th><th>outputs</th>"
        "<th>artifacts</th><th>key metrics</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></body></html>\n"
    )
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(page)
