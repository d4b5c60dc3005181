"""The report runner (thsrn_lib.report): plans, parameter validation, execution, HTML and index.

Uses throwaway jupytext notebooks written into tmp folders: one that succeeds (metrics + a figure),
one that raises, one that exceeds its cell timeout. Three kernel starts in all (~10 s).
"""
from __future__ import annotations

import json
import os
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from thsrn_lib.cli import main as cli_main
from thsrn_lib.errors import ConfigError
from thsrn_lib.report import key_metrics, load_plan, run_plan
from thsrn_lib.report.notebook import declared_parameters, read_notebook
from thsrn_lib.report.render import render_notebook_html

CODE_MARKER = "code-marker-7f3a"  # appears only in a code cell's source, never in an output

GOOD = f'''# %% [markdown]
# # A notebook that works

# %% tags=["parameters"]
output_dir: str = ""  # artifact folder (set by the runner)
scale: float = 2.0  # slope of the plotted line
note: str = ""  # free text copied into metrics.json

# %%
import os
import matplotlib.pyplot as plt
from thsrn_lib import notebook_utils as nbu

out = nbu.output_folder(output_dir, "good")
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1, 2], [0, scale, 2 * scale])  # {CODE_MARKER}
nbu.save_figure(fig, out, "line")
(out / "sub").mkdir(exist_ok=True)
(out / "sub" / "extra.txt").write_text("nested artifact")
nbu.save_metrics(out, {{"slope": scale, "note": note, "backend": os.environ.get("MPLBACKEND", "")}},
                 summary={{"slope": scale}})
'''

BAD = '''# %% tags=["parameters"]
output_dir: str = ""

# %%
print("before the error")

# %%
raise ValueError("deliberate failure for the test")
'''

SLOW = '''# %% tags=["parameters"]
output_dir: str = ""

# %%
import time
time.sleep(60)
'''

NO_PARAMS = '''# %%
x = 1
'''

# Two of these meet: each announces itself, then waits for the other. They can only both finish
# if the runner executes them at the same time.
MEET = '''# %% tags=["parameters"]
output_dir: str = ""
me: str = ""
other: str = ""
meeting_dir: str = ""

# %%
import os, time
from pathlib import Path
from thsrn_lib import notebook_utils as nbu

start = time.time()
Path(meeting_dir, me).touch()
while not Path(meeting_dir, other).exists():
    if time.time() - start > 60:
        raise RuntimeError(f"{other} never started while {me} was running")
    time.sleep(0.05)
nbu.save_metrics(nbu.output_folder(output_dir, me), {"omp": os.environ.get("OMP_NUM_THREADS"), "end": time.time()})
'''

READER = '''# %% tags=["parameters"]
output_dir: str = ""
source: str = ""

# %%
import json, time
from thsrn_lib import notebook_utils as nbu

nbu.save_metrics(nbu.output_folder(output_dir, "reader"),
                 {"slope_read": json.load(open(source))["slope"], "start": time.time()})
'''


@pytest.fixture(scope="module")
def nb_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("notebooks")
    for name, text in {"good": GOOD, "bad": BAD, "slow": SLOW, "noparams": NO_PARAMS, "meet": MEET,
                       "reader": READER}.items():
        (d / f"{name}.py").write_text(text, encoding="utf-8")
    return d


def _write_plan(path: Path, nb_dir: Path, out: Path, **extra) -> Path:
    import yaml

    plan = {
        "name": "unit",
        "output_dir": str(out),
        "notebooks": [
            {"path": str(nb_dir / "good.py"), "parameters": {"scale": 3.0, "note": "{run_dir}/x"}},
            {"path": str(nb_dir / "bad.py")},
        ],
        **extra,
    }
    path.write_text(yaml.safe_dump(plan), encoding="utf-8")
    return path


class _Index(HTMLParser):
    """Collects rows (<tr id=nb-...>) of index.html with their class, hrefs and text."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and (a.get("id") or "").startswith("nb-"):
            self._row = self.rows.setdefault(a["id"][3:], {"class": a.get("class"), "hrefs": [], "text": ""})
        elif self._row is not None and tag == "a":
            self._row["hrefs"].append(a.get("href"))
        elif self._row is not None and tag == "td" and a.get("data-status"):
            self._row["status"] = a["data-status"]

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"] += data


@pytest.fixture(scope="module")
def cli_run(nb_dir, tmp_path_factory):
    """`thsrn report --plan ... --hide-code` on good + bad, with MPLBACKEND=Agg in this process."""
    out = tmp_path_factory.mktemp("report")
    plan = _write_plan(out.parent / f"{out.name}-plan.yaml", nb_dir, out)
    # A stale artifact from an "earlier run" must not be linked.
    (out / "good").mkdir(parents=True)
    stale = out / "good" / "stale.png"
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"
    try:
        rc = cli_main(["report", "--plan", str(plan), "--hide-code"])
        backend_after = os.environ.get("MPLBACKEND")
    finally:
        if saved is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved
    report = json.loads((out / "report.json").read_text())
    return {"rc": rc, "out": out, "report": report, "backend_after": backend_after}


def test_cli_exit_code_nonzero_when_a_notebook_fails(cli_run):
    assert cli_run["rc"] == 1
    statuses = {nb["name"]: nb["status"] for nb in cli_run["report"]["notebooks"]}
    assert statuses == {"good": "ok", "bad": "failed"}
    assert cli_run["report"]["ok"] is False
    assert cli_run["backend_after"] == "Agg"  # the runner restored the caller's environment


def test_executed_notebooks_exist_and_failure_is_visible(cli_run):
    out = cli_run["out"]
    bad = nbformat.read(out / "bad.ipynb", as_version=4)
    errors = [o for c in bad.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ValueError"
    assert "deliberate failure" in errors[0].evalue
    # The cell before the error ran, the papermill error banner is there, the HTML shows the error.
    assert any("before the error" in o.get("text", "") for c in bad.cells for o in c.get("outputs", []))
    assert any("papermill-error-cell-tag" in c.metadata.get("tags", []) for c in bad.cells)
    assert "deliberate failure for the test" in (out / "bad.html").read_text()
    entry = next(nb for nb in cli_run["report"]["notebooks"] if nb["name"] == "bad")
    assert entry["error"].startswith("ValueError: deliberate failure for the test")
    good = nbformat.read(out / "good.ipynb", as_version=4)
    assert good.metadata["papermill"]["input_path"].endswith("good.py")
    injected = [c for c in good.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "scale = 3.0" in injected[0].source


def test_figures_are_in_executed_notebook_despite_agg(cli_run):
    good = nbformat.read(cli_run["out"] / "good.ipynb", as_version=4)
    pngs = [o for c in good.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
    metrics = json.loads((cli_run["out"] / "good" / "metrics.json").read_text())
    assert "inline" in metrics["backend"]  # the kernel did not inherit MPLBACKEND=Agg


def test_artifacts_metrics_and_plan_tokens(cli_run):
    out = cli_run["out"]
    good = next(nb for nb in cli_run["report"]["notebooks"] if nb["name"] == "good")
    assert good["artifacts"] == ["line.png", "metrics.json", "sub/extra.txt"]  # stale.png (old mtime) is not linked
    assert (out / "good" / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert good["metrics"] == {"slope": 3.0}  # the notebook's "summary" block
    assert good["parameters"]["output_dir"] == str(out / "good")
    metrics = json.loads((out / "good" / "metrics.json").read_text())
    assert metrics["note"] == f"{out}/x"  # {run_dir} was substituted


def test_index_links_every_notebook_and_marks_failure(cli_run):
    out = cli_run["out"]
    parser = _Index()
    parser.feed((out / "index.html").read_text())
    assert set(parser.rows) == {"good", "bad"}
    for name, row in parser.rows.items():
        assert f"{name}.html" in row["hrefs"] and f"{name}.ipynb" in row["hrefs"]
        for href in row["hrefs"]:
            assert (out / href).exists(), href
    assert parser.rows["good"]["status"] == "ok" and parser.rows["good"]["class"] == "ok"
    assert "good/line.png" in parser.rows["good"]["hrefs"] and "good/stale.png" not in parser.rows["good"]["hrefs"]
    assert "good/sub/" in parser.rows["good"]["hrefs"] and "(1 file)" in parser.rows["good"]["text"]
    assert parser.rows["bad"]["status"] == "failed" and parser.rows["bad"]["class"] == "failed"
    assert "FAILED" in parser.rows["bad"]["text"] and "deliberate failure for the test" in parser.rows["bad"]["text"]
    assert "1 of 2 notebook(s) FAILED" in (out / "index.html").read_text()


def test_hide_code_removes_code_inputs(cli_run):
    out = cli_run["out"]
    hidden = (out / "good.html").read_text()
    assert CODE_MARKER not in hidden
    assert "A notebook that works" in hidden and "data:image/png;base64" in hidden  # markdown + figure kept
    shown = out / "good-shown.html"
    render_notebook_html(nbformat.read(out / "good.ipynb", as_version=4), shown, hide_code=False)
    assert CODE_MARKER in shown.read_text()


def test_unknown_parameter_is_rejected_before_anything_runs(nb_dir, tmp_path):
    out = tmp_path / "never"
    plan = {"name": "typo", "output_dir": str(out),
            "notebooks": [{"path": str(nb_dir / "bad.py")},  # valid, but must not run either
                          {"path": str(nb_dir / "good.py"), "parameters": {"scael": 1.0}}]}
    with pytest.raises(ConfigError) as exc:
        run_plan(plan)
    msg = str(exc.value)
    assert "good.py" in msg and "'scael'" in msg and "scale: float = 2.0" in msg and "note: str" in msg
    assert not out.exists()


def test_parameter_validation_types_and_parameters_cell(nb_dir, tmp_path):
    with pytest.raises(ConfigError, match="parameter 'scale' expects float"):
        run_plan({"name": "t", "output_dir": str(tmp_path / "o"),
                  "notebooks": [{"path": str(nb_dir / "good.py"), "parameters": {"scale": "big"}}]})
    with pytest.raises(ConfigError, match="no cell tagged 'parameters'"):
        run_plan({"name": "t", "output_dir": str(tmp_path / "o"), "notebooks": [str(nb_dir / "noparams.py")]})
    with pytest.raises(ConfigError, match="set by the runner"):
        load_plan({"name": "t", "notebooks": [{"path": str(nb_dir / "good.py"), "parameters": {"output_dir": "x"}}]})
    declared = declared_parameters(read_notebook(nb_dir / "good.py"))
    assert list(declared) == ["output_dir", "scale", "note"]
    assert declared["scale"]["inferred_type_name"] == "float" and declared["scale"]["default"] == "2.0"


def test_plan_checks(nb_dir, tmp_path, monkeypatch):
    good = str(nb_dir / "good.py")
    with pytest.raises(ConfigError, match="unknown key"):
        load_plan({"name": "t", "notebook": [good]})
    with pytest.raises(ConfigError, match="duplicate notebook name"):
        load_plan({"name": "t", "notebooks": [good, good]})
    with pytest.raises(ConfigError, match="not found"):
        load_plan({"name": "t", "notebooks": [str(nb_dir / "missing.py")]})
    with pytest.raises(ConfigError, match="--only names"):
        load_plan({"name": "t", "notebooks": [good]}, only=["nope"])
    with pytest.raises(ConfigError, match="file not found"):
        load_plan(tmp_path / "absent.yaml")
    monkeypatch.chdir(tmp_path)
    plan = load_plan({"name": "t", "defaults": {"scale": 1.0},
                      "notebooks": [good, {"path": good, "name": "g2", "parameters": {"scale": 5.0}, "timeout": 9}]},
                     only=["g2"], extra_parameters={"note": "n"})
    assert plan.output_dir == (tmp_path / "reports" / "t").resolve()
    assert [s.name for s in plan.notebooks] == ["g2"]
    assert plan.notebooks[0].parameters == {"scale": 5.0, "note": "n"} and plan.notebooks[0].timeout == 9.0


def test_plan_jobs_and_dependencies(nb_dir, tmp_path):
    good, reader = str(nb_dir / "good.py"), str(nb_dir / "reader.py")
    for bad_jobs in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="'jobs' must be a whole number"):
            load_plan({"name": "t", "jobs": bad_jobs, "notebooks": [good]})
    with pytest.raises(ConfigError, match="--jobs"):
        load_plan({"name": "t", "notebooks": [good]}, jobs=0)
    with pytest.raises(ConfigError, match=r"'after' names \['reader'\], which are not earlier"):
        load_plan({"name": "t", "notebooks": [{"path": good, "after": ["reader"]}, reader]})
    with pytest.raises(ConfigError, match="'after' must be a list"):
        load_plan({"name": "t", "notebooks": [good, {"path": reader, "after": [3]}]})
    plan = load_plan({"name": "t", "jobs": 3, "output_dir": str(tmp_path), "notebooks": [
        good, {"path": good, "name": "g2"},
        # implied by {run_dir}/good (not by {run_dir}/g2x, which is no notebook of the plan)
        {"path": reader, "parameters": {"source": "{run_dir}/good/metrics.json", "x": "{run_dir}/g2x"}},
        {"path": reader, "name": "r2", "after": "g2"}]})
    assert plan.jobs == 3
    assert [s.after for s in plan.notebooks] == [(), (), ("good",), ("g2",)]
    assert load_plan({"name": "t", "jobs": 3, "notebooks": [good]}, jobs=1).jobs == 1  # --jobs wins
    only = load_plan({"name": "t", "notebooks": [good, {"path": reader, "after": ["good"]}]}, only=["reader"])
    assert only.notebooks[0].after == ()  # good is not run: its earlier output is used


def test_parallel_run_overlaps_independent_notebooks_and_orders_dependents(nb_dir, tmp_path):
    """jobs=2: meet_a and meet_b must run at the same time (each waits for the other), the reader
    only after `good` wrote its metrics, a failure does not stop the others, and the report keeps
    plan order."""
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    meet = str(nb_dir / "meet.py")
    logs: list[str] = []
    result = run_plan({"name": "par", "output_dir": str(tmp_path / "r"), "jobs": 2, "notebooks": [
        {"path": str(nb_dir / "good.py"), "parameters": {"scale": 4.0}},
        {"path": meet, "name": "meet_a", "parameters": {"me": "a", "other": "b", "meeting_dir": str(meeting)}},
        {"path": meet, "name": "meet_b", "parameters": {"me": "b", "other": "a", "meeting_dir": str(meeting)}},
        {"path": str(nb_dir / "reader.py"), "parameters": {"source": "{run_dir}/good/metrics.json"}},
        {"path": str(nb_dir / "bad.py")},
    ]}, log=logs.append)
    assert [nb.name for nb in result.notebooks] == ["good", "meet_a", "meet_b", "reader", "bad"]
    assert [nb.name for nb in result.failed] == ["bad"], [nb.error for nb in result.failed]
    out = tmp_path / "r"
    good_done = (out / "good" / "metrics.json").stat().st_mtime
    reader = json.loads((out / "reader" / "metrics.json").read_text())
    assert reader["slope_read"] == 4.0 and reader["start"] >= good_done - 1.0
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # the cores are split between the two kernels
    assert json.loads((out / "meet_a" / "metrics.json").read_text())["omp"] in (threads, os.environ.get("OMP_NUM_THREADS"))
    assert any("2 at a time" in m for m in logs)
    report = json.loads((out / "report.json").read_text())
    assert [nb["status"] for nb in report["notebooks"]] == ["ok", "ok", "ok", "ok", "failed"]


def test_cell_timeout_marks_failure_and_keeps_notebook(nb_dir, tmp_path):
    result = run_plan({"name": "slow", "output_dir": str(tmp_path / "r"),
                       "notebooks": [{"path": str(nb_dir / "slow.py"), "timeout": 1}]}, log=lambda m: None)
    assert not result.ok and [nb.name for nb in result.failed] == ["slow"]
    nb = result.notebooks[0]
    assert nb.error.startswith("CellTimeoutError") and nb.seconds < 30
    executed = nbformat.read(nb.executed_path, as_version=4)
    assert "thsrn-report-error" in executed.cells[0].metadata["tags"]  # banner with the error, first cell
    assert nb.html_path.is_file() and result.index_path.is_file()


def test_key_metrics_flattening():
    assert key_metrics({"a": 1, "b": {"c": 2.5, "d": [1, 2]}, "e": "x"}) == {"a": 1, "b.c": 2.5, "e": "x"}
    assert key_metrics({"a": 1, "summary": {"rsum": 400.0}}) == {"rsum": 400.0}
    assert len(key_metrics({f"k{i}": i for i in range(30)}, limit=5)) == 5
