"""Trainer: batch order, config, loss phases, outputs, and exact resumption after a SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from thsrn_lib.checkpoint import load_checkpoint, load_model
from thsrn_lib.errors import ConfigError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.train import EpochBatchSampler, TrainConfig, Trainer
from thsrn_lib.train.config import OptimConfig, parse_override
from thsrn_lib.train.trainer import RankLoss, fill_model_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "scenes_tiny_smoke.yaml"
# Tiny Scenes: 200 training captions -> 7 batches of 32 per epoch (the last one holds 8).
STEPS_PER_EPOCH = 7


def smoke_config(root: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.from_yaml(SMOKE, [f"data.root={root}", f"run.output_dir={out}", "run.progress=false", *overrides])


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------- batch order
def test_sampler_is_a_deterministic_per_epoch_permutation():
    s = EpochBatchSampler(50, 8, seed=3)
    e0, e1 = s.batches(0), s.batches(1)
    assert e0 == EpochBatchSampler(50, 8, seed=3).batches(0)  # same seed, same order
    assert e0 != e1 and e0 != EpochBatchSampler(50, 8, seed=4).batches(0)
    flat = [i for b in e0 for i in b]
    assert sorted(flat) == list(range(50)) and len(e0) == s.num_batches() == 7  # 6 x 8 + 2
    s.set_epoch(1, start_batch=4)
    assert list(s) == e1[4:] and len(s) == 3


def test_sampler_drops_a_final_singleton_batch():
    s = EpochBatchSampler(17, 8, seed=0)
    assert [len(b) for b in s.batches(0)] == [8, 8] and s.num_batches() == 2


def test_sampler_shards_are_disjoint_and_equal_sized():
    shards = [EpochBatchSampler(53, 5, seed=1, rank=r, world_size=3) for r in range(3)]
    items = [[i for b in s.batches(2) for i in b] for s in shards]
    assert len({s.num_batches() for s in shards}) == 1  # collectives stay in step
    assert all(len(x) == 17 for x in items)
    assert not set(items[0]) & set(items[1]) and not set(items[1]) & set(items[2])
    with pytest.raises(ConfigError, match="too few"):
        EpochBatchSampler(3, 2, seed=0, world_size=2)


# ------------------------------------------------------------------------------- config
def test_lr_schedule_follows_the_recipes():
    sgraf = OptimConfig(lr=2e-4, epochs=40, lr_update=30)  # sgraf.md §8: x0.1 every 30 epochs
    assert sgraf.milestones() == [30]
    assert sgraf.lr_at(29) == pytest.approx(2e-4) and sgraf.lr_at(30) == pytest.approx(2e-5)
    steps = OptimConfig(lr=5e-4, epochs=20, lr_steps=[10, 15])
    assert [steps.lr_at(e) for e in (0, 10, 15)] == pytest.approx([5e-4, 5e-5, 5e-6])
    with pytest.raises(ConfigError, match="not both"):
        OptimConfig(lr_update=3, lr_steps=[2]).validate()


def test_config_yaml_and_overrides(tmp_path):
    cfg = TrainConfig.from_yaml(SMOKE, ["optim.lr=1e-3", "optim.lr_steps=[1, 2]", "run.max_steps=null", "model_config.sim_dim=4"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_steps == [1, 2] and cfg.run.max_steps is None
    assert cfg.model == "tshsr" and cfg.model_config["sim_dim"] == 4
    out = tmp_path / "c.yaml"
    cfg.save(out)
    assert TrainConfig.from_yaml(out).to_dict() == cfg.to_dict()
    # the default output folder comes from the recipe name
    (tmp_path / "my_recipe.yaml").write_text("model: sgr\ndata: {root: somewhere}\noptim: {lr: 2e-4}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "my_recipe.yaml")
    assert cfg.run.output_dir == str(Path("runs") / "my_recipe") and cfg.optim.lr == 2e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "valid optim keys: lr, lr_update"),
        ("optimizer.lr=1", "valid keys: model, model_config"),
        ("optim.batch_size=big", "optim.batch_size must be int"),
        ("optim.max_violation=3", "must be bool"),
        ("run.amp=fp8", "run.amp must be one of"),
        ("model_config.no_such_option=1", "no_such_option"),
        ("model=sgraf", "ensemble"),
        ("model=nope", "unknown model 'nope'"),
        ("lr", "key=value"),
    ],
)
def test_bad_overrides_name_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(SMOKE, [override])


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.lr=2e-4") == (["optim", "lr"], 2e-4)
    assert parse_override("data.root=data/scenes/demo") == (["data", "root"], "data/scenes/demo")
    assert parse_override("run.deterministic=true") == (["run", "deterministic"], True)


def test_model_fields_are_filled_from_the_data():
    filled = fill_model_config("sgr", {"embed_size": 8}, vocab_size=30, img_dim=64, num_regions=10)
    assert filled == {"embed_size": 8, "vocab_size": 30, "img_dim": 64, "num_regions": 10}
    with pytest.raises(ConfigError, match="img_dim = 2048 but the data .* 64 feature dimension"):
        fill_model_config("sgr", {"img_dim": 2048}, vocab_size=30, img_dim=64, num_regions=10, source="the data")


# ------------------------------------------------------------------------------- loss phases
def test_rank_loss_switches_negatives_and_computes_in_float32():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(6, 6, generator=g)
    base = ContrastiveLoss(margin=0.2, max_violation=True)
    summed = RankLoss(base, max_violation=False)(sims.bfloat16())
    hardest = RankLoss(base, max_violation=True)(sims)
    assert summed.dtype == torch.float32
    assert summed.item() == pytest.approx(base(sims.bfloat16().float(), max_violation=False).item())
    assert hardest.item() == pytest.approx(base(sims).item())
    assert summed.item() > hardest.item()


# ------------------------------------------------------------------------------- a full run
def test_training_run_writes_everything(scenes_tiny, tmp_path):
    out = tmp_path / "run"
    seen = []
    cfg = smoke_config(scenes_tiny, out, "optim.lr_steps=[1]", "optim.warmup_steps=4", "run.log_every=2")
    result = Trainer(cfg, callbacks=[lambda kind, rec: seen.append((kind, rec))]).fit()
    assert {p.name for p in out.iterdir()} == {"checkpoint_last.pt", "checkpoint_best.pt", "metrics.jsonl", "config.yaml"}
    assert result.step == 2 * STEPS_PER_EPOCH and result.epoch == 2 and not result.interrupted
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == [rec for kind, rec in seen if kind != "checkpoint"]
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    vals = [r for r in records if r["kind"] == "val"]
    assert len(epochs) == 2 and len(vals) == 2 and all(v["end_of_epoch"] for v in vals)
    # learning-rate step at epoch 1 (lr_steps), warm-up with summed violations for 4 steps
    assert all(r["lr"] == pytest.approx(2e-3 if r["epoch"] == 0 else 2e-4) for r in train)
    assert {r["epoch"] for r in train} == {0, 1}
    assert [r["hardest_negatives"] for r in train[:3]] == [False, False, True]
    assert all(r["loss"] > 0 and r["pairs_per_s"] > 0 and "loss_rank" in r and "grad_norm" in r for r in train)
    # the best checkpoint is the epoch with the highest end-of-epoch rsum
    best = max(epochs, key=lambda r: r["rsum"])
    assert result.best_rsum == pytest.approx(best["rsum"]) and result.best_epoch == best["epoch"]
    last = load_checkpoint(out / "checkpoint_last.pt")
    for key in ("optimizer", "scheduler", "scaler", "rng", "train_config", "vocab", "library_version"):
        assert key in last, key
    assert last["epoch"] == 2 and last["batch_in_epoch"] == 0 and last["world_size"] == 1
    assert last["config"]["vocab_size"] > 4 and last["config"]["img_dim"] == 64  # filled from the data
    # the best checkpoint alone rebuilds the model, and re-evaluating it reproduces the logged rsum
    from thsrn_lib.data import PrecompDataset
    from thsrn_lib.evaluation import evaluate

    loaded = load_model(out / "checkpoint_best.pt")
    dev = PrecompDataset(scenes_tiny, "dev", loaded.vocab)
    assert evaluate(loaded.model, dev, "dev", progress=False).metrics["rsum"] == pytest.approx(result.best_rsum)
    assert [kind for kind, _ in seen].count("checkpoint") == 2 + sum(r["is_best"] for r in epochs)


def test_validation_does_not_perturb_training(scenes_tiny, tmp_path):
    """Mid-epoch validations (eval mode, isolated RNG) leave the trained weights bit-identical."""
    plain = Trainer(smoke_config(scenes_tiny, tmp_path / "a", "run.max_steps=6")).fit()
    validated = Trainer(smoke_config(scenes_tiny, tmp_path / "b", "run.max_steps=6", "run.val_every_steps=2")).fit()
    a = load_checkpoint(plain.last_checkpoint)["state_dict"]
    b = load_checkpoint(validated.last_checkpoint)["state_dict"]
    assert state_dicts_equal(a, b)
    vals = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if r["kind"] == "val"] == [2, 4, 6]
    assert not (tmp_path / "b" / "checkpoint_best.pt").exists()  # only end-of-epoch rsum selects


# ------------------------------------------------------------------------------- resumption
N_STEPS = 12  # crosses the end of epoch 0 (step 7: validation, best checkpoint, next epoch)
RESUME_OVERRIDES = ("optim.epochs=3", f"run.max_steps={N_STEPS}", "run.checkpoint_every_steps=3", "run.log_every=2",
                    "optim.warmup_steps=5")


@pytest.fixture(scope="module")
def reference_weights(scenes_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = Trainer(smoke_config(scenes_tiny, out, *RESUME_OVERRIDES)).fit()
    assert result.step == N_STEPS
    return load_checkpoint(result.last_checkpoint)["state_dict"], out


def test_resume_after_sigkill_is_exact(scenes_tiny, tmp_path, reference_weights):
    """A child trains, checkpoints at step 3, is SIGKILLed at step 6; --resume reaches the same weights."""
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from thsrn_lib.train import TrainConfig, Trainer
        cfg = TrainConfig.from_yaml({str(SMOKE)!r}, {[f"data.root={scenes_tiny}", f"run.output_dir={out}",
                                                     "run.progress=false", *RESUME_OVERRIDES]!r})
        def kill(kind, record):
            if kind == "train" and record["step"] >= 5:
                os.kill(os.getpid(), signal.SIGKILL)
        Trainer(cfg, callbacks=[kill]).fit()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6  # work after the checkpoint was logged, then lost

    result = Trainer(smoke_config(scenes_tiny, out, *RESUME_OVERRIDES), resume=True).fit()
    assert result.step == N_STEPS
    reference, ref_dir = reference_weights
    assert state_dicts_equal(load_checkpoint(out / "checkpoint_last.pt")["state_dict"], reference)
    # the resumed log has no duplicate steps and matches the uninterrupted one (timings aside)
    def numbers(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        drop = {"pairs_per_s", "steps_per_s", "elapsed_s", "val_seconds"}
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    assert numbers(out) == numbers(ref_dir)


def test_cli_run_killed_at_an_arbitrary_moment_resumes_exactly(scenes_tiny, tmp_path, reference_weights):
    out = tmp_path / "cli"
    args = ["--config", str(SMOKE), "--output-dir", str(out), "--no-progress", f"data.root={scenes_tiny}",
            *RESUME_OVERRIDES, "run.checkpoint_every_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "thsrn_lib.train", *args], env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (out / "checkpoint_last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # somewhere in the middle of the following steps (or of a checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # killed mid-run, not finished
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] < N_STEPS
    from thsrn_lib.cli import main

    assert main(["train", *args, "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] == N_STEPS
    assert state_dicts_equal(load_checkpoint(out / "checkpoint_last.pt")["state_dict"], reference_weights[0])
    assert not list(out.glob(".*.tmp"))  # a torn temporary file from the kill is cleaned up


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_and_saves(scenes_tiny, tmp_path, signum):
    """SIGTERM/SIGINT (e.g. Ctrl-C, a scheduler's preemption) end the run cleanly after the current step."""

    def stop_at_step_3(kind, record):
        if kind == "train" and record["step"] == 2:
            os.kill(os.getpid(), signum)  # delivered to the trainer's handler, not to pytest

    previous = signal.getsignal(signum)
    cfg = smoke_config(scenes_tiny, tmp_path / "stop", "optim.epochs=50", "run.log_every=2")
    result = Trainer(cfg, callbacks=[stop_at_step_3]).fit()
    assert signal.getsignal(signum) == previous  # handlers restored
    assert result.interrupted and result.step == 2
    ck = load_checkpoint(result.last_checkpoint)
    assert ck["step"] == 2 and ck["epoch"] == 0 and ck["batch_in_epoch"] == 2
    resumed = Trainer(smoke_config(scenes_tiny, tmp_path / "stop", "optim.epochs=50", "run.max_steps=3"), resume=True).fit()
    assert resumed.step == 3 and not resumed.interrupted


def test_thread_setting_applies_only_during_the_run(scenes_tiny, tmp_path):
    seen = []
    cfg = smoke_config(scenes_tiny, tmp_path / "t", "run.threads=2", "run.max_steps=1", "run.log_every=1",
                       "data.val_split=null")
    before = torch.get_num_threads()
    result = Trainer(cfg, callbacks=[lambda kind, rec: seen.append(torch.get_num_threads())]).fit()
    assert seen and set(seen) == {2} and torch.get_num_threads() == before
    assert result.best_checkpoint is None and result.last_checkpoint is not None  # no validation split, no best


def test_log_window_flags_a_diverged_loss():
    from thsrn_lib.train.distributed import DistInfo
    from thsrn_lib.train.trainer import _Accumulator

    acc = _Accumulator(torch.device("cpu"))
    acc.add(torch.tensor(2.0), {"loss_rank": torch.tensor(1.0)}, torch.tensor(0.5), pairs=4)
    acc.add(torch.tensor(4.0), {"loss_rank": torch.tensor(3.0)}, torch.tensor(1.5), pairs=4)
    assert acc.means(DistInfo()) == {"grad_norm": 1.0, "loss": 3.0, "loss_rank": 2.0} and not acc.all_nonfinite
    restored = _Accumulator.from_state_dict(acc.state_dict(), torch.device("cpu"))
    assert restored.means(DistInfo()) == acc.means(DistInfo()) and restored.pairs == 8
    bad = _Accumulator(torch.device("cpu"))
    for _ in range(2):
        bad.add(torch.tensor(float("nan")), {}, None, pairs=4)
    bad.means(DistInfo())
    assert bad.all_nonfinite
