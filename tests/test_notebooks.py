"""Executes the notebooks of reports/plans/smoke.yaml through the report runner and checks their artifacts.

Scenes `tiny`, a few training steps per model; one kernel per notebook. Generated data goes to a
temporary folder (every notebook that declares ``scenes_dir`` gets it). Whole module: about
2-3 minutes on 2 CPU cores (kernel start-up and imports are a large part of it).
"""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml

from thsrn_lib.evaluation import METRIC_KEYS
from thsrn_lib.report import run_plan
from thsrn_lib.report.notebook import declared_parameters, read_notebook

REPO = Path(__file__).resolve().parents[1]
SMOKE_PLAN = REPO / "reports" / "plans" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow

# Figures each notebook must write (more are allowed).
FIGURES = {
    "00_quickstart": {"examples", "training", "retrieval", "alignment"},
    "01_data_tour": {"captions", "features", "samples", "scenes"},
    "02_train": {"training", "throughput"},
    "03_evaluate": {"recall_at_k", "rank_distributions", "best_worst_queries"},
    "04_compare_models": {"ablation_rsum", "recall_at_k", "learning_curves"},
    "05_alignments": {
        "word_to_region_tshsr", "heatmap_fallback", "reasoning_graph_tshsr", "gates_tshsr",
        "stream_scores", "gallery_images", "gallery_captions",
    },
    "06_attributions": {"attention_vs_attribution_tshsr", "pointing_accuracy"},
}


def _strict_json(path: Path) -> dict:
    def no_constants(name: str):
        raise ValueError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def _check_recalls(m: dict, where: str) -> None:
    assert set(METRIC_KEYS) <= set(m), where
    for d in ("i2t", "t2i"):
        r1, r5, r10 = (m[f"{d}_r{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 <= 100.0, (where, d, r1, r5, r10)
        assert m[f"{d}_medr"] >= 1 and m[f"{d}_meanr"] >= 1, where
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))), where


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    plan = yaml.safe_load(SMOKE_PLAN.read_text(encoding="utf-8"))
    scenes = tmp_path_factory.mktemp("scenes")
    for entry in plan["notebooks"]:
        entry["path"] = str(REPO / entry["path"])
        if "scenes_dir" in declared_parameters(read_notebook(entry["path"])):
            entry.setdefault("parameters", {})["scenes_dir"] = str(scenes)
    plan["output_dir"] = str(tmp_path_factory.mktemp("report") / "smoke")
    result = run_plan(plan)
    for nb in result.notebooks:  # timings, visible with pytest -s or in the -ra summary of a failure
        print(f"smoke notebook {nb.name}: {nb.status} in {nb.seconds:.1f} s")
    return result


def _entry(smoke, name: str):
    found = [nb for nb in smoke.notebooks if nb.name == name]
    assert found, f"{name} is not in {SMOKE_PLAN}"
    nb = found[0]
    assert nb.ok, f"{name} failed: {nb.error} (see {nb.executed_path})"
    return nb


def test_plan_covers_the_notebooks(smoke):
    assert [nb.name for nb in smoke.notebooks] == list(FIGURES)
    failed = {nb.name: nb.error for nb in smoke.failed}
    assert not failed, failed


def _plan_names() -> list[str]:
    plan = yaml.safe_load(SMOKE_PLAN.read_text(encoding="utf-8"))
    return [e.get("name") or Path(e["path"]).stem for e in plan["notebooks"]]


@pytest.mark.parametrize("name", _plan_names())
def test_artifacts_written_and_rendered(smoke, name):
    """Every notebook of the plan: strict metrics.json, PNG figures written and shown in the executed notebook."""
    nb = _entry(smoke, name)
    _strict_json(nb.artifacts_dir / "metrics.json")
    assert nb.metrics, f"{name}: no key metrics for the index"
    pngs = {Path(a).stem for a in nb.artifacts if a.endswith(".png") and "/" not in a}
    expected = FIGURES.get(name, set())
    assert pngs and expected <= pngs, f"{name}: missing figures {expected - pngs}"
    for stem in pngs:
        data = (nb.artifacts_dir / f"{stem}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 2000, stem
    executed = nbformat.read(nb.executed_path, as_version=4)
    shown = sum("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    assert shown >= max(1, len(expected)), f"{name}: only {shown} figures rendered in the executed notebook"
    assert nb.html_path.is_file()


def test_quickstart_metrics(smoke):
    m = _strict_json(_entry(smoke, "00_quickstart").artifacts_dir / "metrics.json")
    _check_recalls(m["test"], "00 test")
    assert m["preset"] == "tiny" and m["train_steps"] == 6 and m["train_seconds"] > 0
    ceiling = m["t2i_ceiling"]
    assert 0 < ceiling["t2i_r1"] <= ceiling["t2i_r5"] <= ceiling["t2i_r10"] <= 100
    assert 1 <= m["query_rank_t2i"] <= 12  # tiny test split: 12 images
    assert m["pointing"] and all(isinstance(p["hit"], bool) for p in m["pointing"])
    assert 0.0 <= m["pointing_hit_rate"] <= 1.0
    assert m["summary"]["rsum"] == pytest.approx(m["test"]["rsum"])


def test_data_tour_metrics(smoke):
    m = _strict_json(_entry(smoke, "01_data_tour").artifacts_dir / "metrics.json")
    assert m["scenes"] is True
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 40, "dev": 12, "test": 12}
    for v in m["splits"].values():
        assert v["captions"] == 5 * v["images"]
        assert 1 <= v["len_median"] <= v["len_max"] and 0 <= v["unk_rate_percent"] <= 100
    assert m["vocab_size"] > 4
    assert sum(m["scenes_info"]["objects_per_image"].values()) == 12
    assert {"colour", "shape"} <= set(m["scenes_info"]["aligned_word_types"])


def test_train_metrics_and_checkpoints(smoke):
    nb = _entry(smoke, "02_train")
    m = _strict_json(nb.artifacts_dir / "metrics.json")
    assert m["epochs"] == 2 and m["steps"] > 0 and 0 <= m["best_rsum"] <= 600
    assert m["config"]["data"]["root"].endswith("tiny") and m["model_options"]["embed_size"] == 32
    _check_recalls(m["last_val"], "02 last validation")
    assert Path(m["best_checkpoint"]).is_file() and Path(m["last_checkpoint"]).is_file()


def test_evaluate_metrics(smoke):
    m = _strict_json(_entry(smoke, "03_evaluate").artifacts_dir / "metrics.json")
    assert list(m["results"]) == ["best", "last", "best + last"]
    for name, r in m["results"].items():
        _check_recalls(r, f"03 {name}")
    assert m["protocol"] == "scenes" and len(m["queries"]) == 4
    assert m["summary"]["best_rsum"] == max(r["rsum"] for r in m["results"].values())
    assert all(1 <= v["t2i_worst_rank"] <= 12 for v in m["rank_stats"].values())


def test_compare_models_metrics(smoke):
    m = _strict_json(_entry(smoke, "04_compare_models").artifacts_dir / "metrics.json")
    assert set(m["results"]) == {"TSHSR", "T2I stream only", "I2T stream only", "SGR"}
    assert m["variants"]["T2I stream only"]["streams"] == ["t2i"]
    for name, r in m["results"].items():
        _check_recalls(r, f"04 {name}")
        assert 0.0 <= r["binding_acc"] <= 100.0 and r["parameters"] > 0
    assert m["results"]["TSHSR"]["delta_rsum"] == 0.0


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.append(dict(attrs).get("href", ""))


def test_index_links_every_notebook(smoke):
    parser = _Links()
    parser.feed(smoke.index_path.read_text(encoding="utf-8"))
    for nb in smoke.notebooks:
        assert f"{nb.name}.html" in parser.hrefs and f"{nb.name}.ipynb" in parser.hrefs
