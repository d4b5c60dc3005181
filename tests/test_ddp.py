"""Multi-process training: ``torchrun --nproc_per_node=2 -m thsrn_lib.train`` on the CPU with gloo."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from thsrn_lib.checkpoint import load_checkpoint, load_model
from thsrn_lib.models import create
from thsrn_lib.train.trainer import parameter_fingerprint

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "scenes_tiny_smoke.yaml"


def test_torchrun_two_cpu_processes(scenes_tiny, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # 200 captions / 2 ranks = 100 per rank -> batches of 32, 32, 32, 4: three steps stay inside epoch 0,
    # so only checkpoint_last.pt is written (checkpoint_best.pt needs an end-of-epoch validation).
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "thsrn_lib.train", "--config", str(SMOKE), "--output-dir", str(out), "--device", "cpu",
        "--no-progress", "--max-steps", "3", f"data.root={scenes_tiny}", "run.log_every=1", "run.val_every_steps=2",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes (gloo)" in proc.stdout

    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint_last.pt"]
    ck = load_checkpoint(out / "checkpoint_last.pt")
    assert ck["step"] == 3 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # each rank its own dropout stream

    # every rank ended with the same parameters, and they are the ones rank 0 saved
    prints = dict(re.findall(r"rank (\d+): parameter fingerprint ([0-9a-f]+)", proc.stdout))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], proc.stdout
    loaded = load_model(out / "checkpoint_last.pt")
    assert parameter_fingerprint(loaded.model) == prints["0"]
    torch.manual_seed(0)  # the run's seed: the initial weights, which training must have changed
    initial = create(loaded.model_name, **loaded.config)
    assert parameter_fingerprint(initial) != prints["0"]

    # only rank 0 logs: one line per step, validations (sharded over both ranks) at step 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2] and 0 < vals[0]["rsum"] <= 600
