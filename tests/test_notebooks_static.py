"""Static checks of notebooks/ (no kernel): parameters cells, no stray .ipynb, jupytext config."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from thsrn_lib.report.notebook import declared_parameters, lint_notebook_sources, read_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = ["00_quickstart", "01_data_tour", "02_train", "03_evaluate", "04_compare_models"]


def test_repository_notebooks_are_clean():
    problems = lint_notebook_sources(NOTEBOOKS)
    assert not problems, "\n".join(problems)


def test_expected_notebooks_present():
    stems = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
    assert [s for s in EXPECTED if s not in stems] == []


def test_each_notebook_cites_and_saves():
    """Every notebook ends with saved artifacts and names the papers of the models it uses."""
    for path in sorted(NOTEBOOKS.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "save_metrics(" in text and "save_figure(" in text, path
        assert "../shared" not in text and "/work/shared" not in text, f"{path} must not depend on ../shared"


def test_jupytext_config_has_no_pairing():
    """Pairing (formats = "ipynb,py:percent") would make JupyterLab write .ipynb files into notebooks/."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads((REPO / "jupytext.toml").read_text(encoding="utf-8"))
    assert "formats" not in cfg and "default_jupytext_formats" not in cfg
    assert cfg["preferred_jupytext_formats_save"] == "py:percent"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD = '# %% tags=["parameters"]\noutput_dir: str = ""  # artifacts\nsmoke: bool = False  # tiny run\n\n# %%\nx = 1\n'


def test_lint_flags_missing_or_duplicate_parameters_cells(tmp_path):
    _write(tmp_path / "ok.py", GOOD)
    assert lint_notebook_sources(tmp_path) == []
    _write(tmp_path / "none.py", "# %%\nx = 1\n")
    _write(tmp_path / "two.py", GOOD + '\n# %% tags=["parameters"]\ny: int = 2  # again\n')
    _write(tmp_path / "undoc.py", '# %% tags=["parameters"]\noutput_dir: str = ""  # a\nsmoke: bool = False  # b\n'
                                  'lr = 0.1\n')
    _write(tmp_path / "nosmoke.py", '# %% tags=["parameters"]\noutput_dir: str = ""  # artifacts\n')
    problems = "\n".join(lint_notebook_sources(tmp_path))
    assert "none.py: has no cell tagged 'parameters'" in problems
    assert "two.py: has 2 cells tagged 'parameters'" in problems
    assert "undoc.py: parameter 'lr' needs a type annotation and a comment" in problems
    assert "nosmoke.py: the parameters cell must declare 'smoke'" in problems
    assert "ok.py" not in problems


def test_lint_flags_stray_ipynb(tmp_path):
    _write(tmp_path / "ok.py", GOOD)
    nb = read_notebook(tmp_path / "ok.py")
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(nb, tmp_path / "ok.ipynb")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    nbformat.write(nb, tmp_path / ".ipynb_checkpoints" / "ok-checkpoint.ipynb")  # Jupyter's own, ignored
    problems = lint_notebook_sources(tmp_path)
    assert len(problems) == 1 and "ok.ipynb: stray .ipynb (with outputs)" in problems[0]
    assert declared_parameters(nb)["smoke"]["default"] == "False"


def test_lint_flags_lines_papermill_cannot_read(tmp_path):
    _write(tmp_path / "eq.py", '# %% tags=["parameters"]\noutput_dir: str = ""  # a\nsmoke: bool = False  # b\n'
                               'lr: float = 0.1  # step size (default = 0.1)\n')
    problems = "\n".join(lint_notebook_sources(tmp_path))
    assert "papermill cannot read parameter(s) 'lr' (line 3 of the cell)" in problems


def test_report_plans_are_valid(monkeypatch):
    """Every plan in reports/plans loads and passes parameter validation (demo.yaml is never executed by tests)."""
    from thsrn_lib.report import load_plan
    from thsrn_lib.report.notebook import validate_parameters

    monkeypatch.chdir(REPO)  # plan paths are relative to the repository root
    plans = sorted((REPO / "reports" / "plans").glob("*.yaml"))
    assert {p.stem for p in plans} >= {"demo", "smoke"}
    for path in plans:
        plan = load_plan(path)
        assert plan.output_dir == REPO / "reports" / plan.name
        for spec in plan.notebooks:
            validate_parameters(read_notebook(spec.path), spec.parameters, spec.path)
    demo = load_plan(REPO / "reports" / "plans" / "demo.yaml")
    assert [s.name for s in demo.notebooks][:5] == EXPECTED
