"""Scale-out evaluation: 2 CPU processes on gloo (torchrun) produce the single-process matrix.

The test launches this same file under ``python -m torch.distributed.run``; the ``__main__``
block is the per-rank worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from thsrn_lib.evaluation import Protocol
from thsrn_lib.evaluation.distributed import gather_rows, row_ranges

N_IMAGES, REGIONS, FEAT_DIM = 12, 4, 10
BATCH, IMAGE_SHARD, CAPTION_SHARD = 5, 3, 7  # ranks get rows [0, 10) and [10, 12): uneven on purpose
THREE_FOLDS = Protocol("three_folds", "test", folds=3, description="3 folds of 4 images")
REPO = Path(__file__).resolve().parents[1]


def run_worker(root: str, ckpt: str, out: str) -> None:
    """Per-rank body: evaluate three ways and save what this rank received."""
    import torch.distributed as dist

    from thsrn_lib.checkpoint import load_model
    from thsrn_lib.data import PrecompDataset
    from thsrn_lib.evaluation import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(out)
    lm = load_model(ckpt)
    ds = PrecompDataset(root, "test", lm.vocab)
    kw = dict(batch_size=BATCH, image_shard=IMAGE_SHARD, caption_shard=CAPTION_SHARD, progress=False)
    report = {}
    res = evaluate(lm.model, ds, "generic", out_dir=out_dir / "files", **kw)
    np.save(out_dir / f"all_rank{rank}.npy", res.sims)
    report["all"] = {"metrics": res.metrics, "world_size": res.info["world_size"]}
    res = evaluate(lm.model, ds, "generic", gather_to=0, **kw)
    if res.sims is not None:
        np.save(out_dir / f"to0_rank{rank}.npy", res.sims)
    report["to0"] = {"metrics": res.metrics, "has_sims": res.sims is not None}
    res = evaluate(lm.model, ds, THREE_FOLDS, **kw)
    np.save(out_dir / f"folds_rank{rank}.npy", res.sims)
    report["folds"] = {"metrics": res.metrics}
    (out_dir / f"report_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_row_ranges_cover_rows_on_batch_boundaries():
    assert row_ranges(12, 2, align=5) == [(0, 10), (10, 12)]
    assert row_ranges(12, 3, align=5) == [(0, 5), (5, 10), (10, 12)]
    assert row_ranges(3, 4, align=1) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert row_ranges(1000, 3) == [(0, 334), (334, 667), (667, 1000)]


def test_gather_rows_single_process_is_a_copy():
    local = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(gather_rows(local, [(0, 3)]), local)


def _make_data_and_checkpoint(tmp: Path) -> tuple[Path, Path]:
    from thsrn_lib.checkpoint import model_payload, save_checkpoint
    from thsrn_lib.data import Vocab
    from thsrn_lib.models import create

    rng = np.random.default_rng(0)
    root = tmp / "data"
    root.mkdir()
    np.save(root / "test_ims.npy", rng.standard_normal((N_IMAGES, REGIONS, FEAT_DIM)).astype(np.float32))
    words = "a red blue circle square left of the big small".split()
    caps = [" ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(5 * N_IMAGES)]
    (root / "test_caps.txt").write_text("\n".join(caps) + "\n")
    vocab = Vocab.build(caps, min_count=1)
    torch.manual_seed(0)
    model = create(
        "sgr",
        vocab_size=len(vocab),
        img_dim=FEAT_DIM,
        word_dim=8,
        embed_size=8,
        num_regions=REGIONS,
        sim_dim=8,
        sgr_step=1,
    )
    ckpt = save_checkpoint(tmp / "sgr.pt", model_payload(model, vocab))
    return root, ckpt


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    from thsrn_lib.checkpoint import load_model
    from thsrn_lib.data import PrecompDataset
    from thsrn_lib.evaluation import evaluate

    root, ckpt = _make_data_and_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        str(root),
        str(ckpt),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if "Address already in use" in proc.stderr or "errno: 98" in proc.stderr.lower():
            pytest.skip(f"could not open a local rendezvous port: {proc.stderr[-300:]}")
        pytest.fail(f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

    lm = load_model(ckpt)
    ds = PrecompDataset(root, "test", lm.vocab)
    kw = dict(batch_size=BATCH, image_shard=IMAGE_SHARD, caption_shard=CAPTION_SHARD, progress=False)
    single = evaluate(lm.model, ds, "generic", **kw)
    single_folds = evaluate(lm.model, ds, THREE_FOLDS, **kw)
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in (0, 1)]

    for r in (0, 1):  # gather_to="all": every rank holds the whole matrix
        np.testing.assert_allclose(np.load(out / f"all_rank{r}.npy"), single.sims, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.load(out / f"folds_rank{r}.npy"), single_folds.sims, rtol=0, atol=1e-6)
        assert reports[r]["all"]["world_size"] == 2
        assert reports[r]["all"]["metrics"] == pytest.approx(single.metrics)
        assert reports[r]["folds"]["metrics"] == pytest.approx(single_folds.metrics)
        assert reports[r]["to0"]["metrics"] == pytest.approx(single.metrics)  # broadcast from rank 0
    # gather_to=0: only rank 0 receives the matrix
    assert reports[0]["to0"]["has_sims"] and not reports[1]["to0"]["has_sims"]
    np.testing.assert_allclose(np.load(out / "to0_rank0.npy"), single.sims, rtol=0, atol=1e-6)
    # files are written once, by rank 0
    np.testing.assert_allclose(np.load(out / "files" / "sims.npy"), single.sims, rtol=0, atol=1e-6)
    assert json.loads((out / "files" / "metrics.json").read_text())["info"]["world_size"] == 2


if __name__ == "__main__":
    run_worker(*sys.argv[1:4])
