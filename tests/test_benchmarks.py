"""The scoring benchmark's per-caption baselines are exact, and its rows report what they claim."""
from __future__ import annotations

import pytest
import torch

from benchmarks import baselines, scoring
from thsrn_lib.models import create
from thsrn_lib.models.sgraf import reference_similarity

SMALL = dict(img_dim=12, embed_size=16, sim_dim=8, num_regions=5, word_dim=6, vocab_size=40)


@pytest.mark.parametrize("name", ["sgr", "saf"])
def test_official_style_baseline_equals_the_reference(name, monkeypatch):
    monkeypatch.setattr(baselines, "OFFICIAL_SHARD", 3)  # 7 captions: shards of 3, 3 and 1
    torch.manual_seed(0)
    model = create(name, **SMALL).eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(4, 5, 12, generator=g)
    lengths = torch.tensor([5, 2, 7, 3, 1, 6, 4])
    ids = torch.randint(4, 40, (7, 7), generator=g) * (torch.arange(7) < lengths[:, None])
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        official = baselines.official_style_similarity(model, img["regions"], txt["words"], lengths)
        lean = reference_similarity(model, img["regions"], txt["words"], lengths)
        fast = model.score(img, txt)
    assert official.shape == (4, 7)
    torch.testing.assert_close(official, lean, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, official, atol=1e-6, rtol=0)


def test_bench_rows_compare_the_fast_path_with_both_baselines(monkeypatch):
    monkeypatch.setattr(scoring, "PAPER", {**SMALL, "num_regions": 5})
    row = scoring.bench_model("sgr", 6, 9, None, None, baselines=True, repeat=1)
    assert row["pairs"] == 54 and row["max_abs_diff"] < 1e-5
    for key in ("official", "lean"):
        assert row[f"speedup_vs_{key}"] == pytest.approx(row["pairs_per_s"] / row[f"{key}_pairs_per_s"])
    assert row["ref_flops_per_pair"] > row["flops_per_pair"]  # the baselines run SGR's unfolded steps
    tshsr = scoring.bench_model("tshsr", 4, 5, None, None, baselines=False, repeat=1)
    assert tshsr["max_abs_diff"] < 1e-5 and "official_pairs_per_s" not in tshsr


def test_round_robin_keeps_each_functions_best_round():
    calls = []
    best = scoring.time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 3 and set(best) == {"a", "b"} and min(best.values()) >= 0


def test_run_reports_a_part_that_cannot_run_and_goes_on(monkeypatch, capsys):
    import sys
    import types

    from benchmarks import run
    from thsrn_lib.errors import ConfigError

    ran = []
    ok, broken = types.ModuleType("bench_ok"), types.ModuleType("bench_broken")
    ok.main = lambda args: ran.append("ok")

    def fail(args):
        raise ConfigError("runs/x not found: run `make demo` first")

    broken.main = fail
    monkeypatch.setitem(sys.modules, "bench_ok", ok)
    monkeypatch.setitem(sys.modules, "bench_broken", broken)
    monkeypatch.setattr(run, "PARTS", {"broken": ("bench_broken", []), "ok": ("bench_ok", [])})
    assert run.main([]) == 1
    assert ran == ["ok"]  # the part after the failed one still ran
    assert "broken did not run: runs/x not found" in capsys.readouterr().err


def test_two_stage_benchmark_names_the_missing_checkpoint(tmp_path):
    from benchmarks import two_stage
    from thsrn_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="make demo"):
        two_stage.main(["--rerank", str(tmp_path / "nope"), "--data", str(tmp_path)])


def test_peak_tensor_memory_counts_live_tensors_not_freed_ones():
    from benchmarks.common import peak_tensor_mb

    def two_live_then_freed():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a + 1  # 4 MiB more while a is alive
        del a, b
        torch.zeros(256, 1024)  # 1 MiB after both were freed: no new peak

    assert peak_tensor_mb(two_live_then_freed) == pytest.approx(8.0, abs=0.1)


@pytest.mark.parametrize("argv", [["--images", "0"], ["--captions", "-3"], ["--repeat", "x"], ["--threads", "-1"]])
def test_scoring_rejects_bad_sizes_before_running(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        scoring.main(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err
