"""``thsrn train`` error paths: one clear message, exit status 2, no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from thsrn_lib.checkpoint import load_checkpoint
from thsrn_lib.cli import main
from thsrn_lib.data import Vocab
from thsrn_lib.train.config import option_help

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "scenes_tiny_smoke.yaml"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("thsrn train: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_help_documents_every_option_and_key(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--resume", "--overwrite", "--output-dir", "--device", "--amp", "--seed", "--max-steps",
                 "--no-progress", "--print-config", "KEY=VALUE"):
        assert flag in out, flag
    for key, help_text, _ in option_help():
        assert key in out and help_text.split()[0] in out, key
    assert "torchrun" in out and "model_config.<option>" in out


def test_print_config_applies_overrides_and_flags(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--config", str(SMOKE), "--print-config", "--seed", "7", "--output-dir",
                           str(tmp_path / "x: y"), "optim.lr=3e-4", "model_config.sim_dim=4")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["run"]["seed"] == 7 and cfg["optim"]["lr"] == 3e-4 and cfg["model_config"]["sim_dim"] == 4
    assert cfg["run"]["output_dir"] == str(tmp_path / "x: y")  # a path is taken as is, not parsed as YAML


def test_missing_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert_clean_error(code, err, "nope.yaml not found")
    code, _, err = run_cli(capsys, "--config", str(REPO / "configs" / "no_such_recipe.yaml"))
    assert_clean_error(code, err, "Recipes in", "scenes_tiny_smoke.yaml")


def test_bad_yaml_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: sgr\noptim:\n  lr: [1e-3\n")
    code, _, err = run_cli(capsys, "--config", str(bad))
    assert_clean_error(code, err, str(bad), "not valid YAML", "line")


def test_unknown_recipe_key_lists_valid_ones(capsys, tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model: sgr\ndata: {root: x}\noptim: {learning_rate: 1.0e-3}\n")
    code, _, err = run_cli(capsys, "--config", str(bad))
    assert_clean_error(code, err, "optim.learning_rate", "valid optim keys", "lr")
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "optim.lrr=1")
    assert_clean_error(code, err, "optim.lrr", "valid optim keys")
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "model_config.hsr_levelz=2")
    assert_clean_error(code, err, "hsr_levelz", "valid options")


def test_bad_values(capsys):
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "optim.batch_size=1")
    assert_clean_error(code, err, "optim.batch_size must be >= 2")
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--max-steps", "0")
    assert_clean_error(code, err, "--max-steps must be >= 1")
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--device", "tpu")
    assert_clean_error(code, err, "run.device")


def test_missing_data(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--output-dir", str(tmp_path / "run"),
                           f"data.root={tmp_path / 'no_data'}")
    assert_clean_error(code, err, "no_data", "does not exist")


def test_data_model_mismatch(capsys, scenes_tiny, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--output-dir", str(tmp_path / "run"),
                           f"data.root={scenes_tiny}", "model_config.img_dim=2048")
    assert_clean_error(code, err, "model_config.img_dim = 2048", "64 feature dimension")


def test_resume_without_a_checkpoint(capsys, scenes_tiny, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--output-dir", str(tmp_path / "empty"),
                           f"data.root={scenes_tiny}", "--resume")
    assert_clean_error(code, err, "cannot resume", "checkpoint_last.pt does not exist", "without --resume")


def test_corrupt_checkpoint_on_resume(capsys, scenes_tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_last.pt").write_bytes(b"\x00garbage" * 10)
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--output-dir", str(run), f"data.root={scenes_tiny}", "--resume")
    assert_clean_error(code, err, str(run / "checkpoint_last.pt"), "cannot be read")


def test_existing_run_needs_resume_or_overwrite_and_resume_checks_the_model(capsys, scenes_tiny, tmp_path):
    run = tmp_path / "run"
    base = ["--config", str(SMOKE), "--output-dir", str(run), "--no-progress"]
    data = f"data.root={scenes_tiny}"
    code, out, _ = run_cli(capsys, *base, "--max-steps", "2", data)
    assert code == 0 and "last checkpoint (step 2)" in out
    code, _, err = run_cli(capsys, *base, "--max-steps", "2", data)
    assert_clean_error(code, err, "already holds a run", "--resume", "--overwrite")
    code, _, err = run_cli(capsys, *base, "--resume", data, "model_config.sim_dim=4")
    assert_clean_error(code, err, "cannot resume", "sim_dim")
    swapped = Vocab.load(scenes_tiny / "vocab.json")
    words = list(swapped.idx2word)
    words[4], words[5] = words[5], words[4]
    Vocab(words).save(tmp_path / "swapped_vocab.json")
    code, _, err = run_cli(capsys, *base, "--resume", data, f"data.vocab={tmp_path / 'swapped_vocab.json'}")
    assert_clean_error(code, err, "another vocab")
    code, out, _ = run_cli(capsys, *base, "--resume", "--max-steps", "3", data)
    assert code == 0 and "resuming at epoch 0, step 2" in out
    assert load_checkpoint(run / "checkpoint_last.pt")["step"] == 3
    code, out, _ = run_cli(capsys, *base, "--overwrite", "--max-steps", "1", data)
    assert code == 0 and load_checkpoint(run / "checkpoint_last.pt")["step"] == 1
    code, _, err = run_cli(capsys, *base, "--overwrite", "--resume", data)
    assert_clean_error(code, err, "exclude each other")


def test_resume_refuses_a_model_only_file(capsys, scenes_tiny, tmp_path):
    import torch

    from thsrn_lib.checkpoint import model_payload, save_checkpoint
    from thsrn_lib.models import create

    run = tmp_path / "run"
    model = create("tshsr", vocab_size=10, img_dim=64, num_regions=10, word_dim=8, embed_size=8, sim_dim=4)
    save_checkpoint(run / "checkpoint_last.pt", model_payload(model))
    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["format"] == "thsrn-model"
    code, _, err = run_cli(capsys, "--config", str(SMOKE), "--output-dir", str(run), "--resume", f"data.root={scenes_tiny}")
    assert_clean_error(code, err, "holds a model only")


def test_device_and_precision_that_this_machine_lacks(capsys, scenes_tiny, tmp_path):
    import torch

    base = ["--config", str(SMOKE), "--output-dir", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *base, "--device", "cpu", "--amp", "fp16", f"data.root={scenes_tiny}")
    assert_clean_error(code, err, "amp 'fp16' needs a CUDA device")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, *base, "--device", "cuda", f"data.root={scenes_tiny}")
        assert_clean_error(code, err, "sees no CUDA GPU", "--device cpu")
