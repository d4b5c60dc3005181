"""Checkpoint files: atomic writes, weights_only loading, clear errors, rebuilding models, RNG state."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from thsrn_lib.checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    load_checkpoint,
    load_model,
    model_payload,
    resolve_checkpoint,
    save_checkpoint,
)
from thsrn_lib.data import Vocab
from thsrn_lib.errors import CheckpointError
from thsrn_lib.models import create
from thsrn_lib.utils.seed import get_rng_state, preserve_rng, seed_everything, set_rng_state

TINY = dict(vocab_size=12, img_dim=10, num_regions=4, word_dim=8, embed_size=8, sim_dim=6, sgr_step=1)


class NotPlainData:
    """Pickled by reference: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.value = 3


def _vocab() -> Vocab:
    return Vocab(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])


def _inputs():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 10, generator=g)
    lengths = torch.tensor([5, 3, 4, 2])
    ids = torch.randint(4, 12, (4, 5), generator=g)
    ids = ids.masked_fill(torch.arange(5) >= lengths[:, None], 0)
    return feats, ids, lengths


def _model():
    torch.manual_seed(3)
    model = create("sgr", **TINY)
    # Move BatchNorm running stats away from their defaults so that buffers are checked too.
    model.train()
    feats, ids, lengths = _inputs()
    model(feats, ids, lengths)
    return model.eval()


def test_round_trip_rebuilds_identical_model(tmp_path):
    model, vocab = _model(), _vocab()
    payload = model_payload(model, vocab)
    payload.update(format=CHECKPOINT_FORMAT, epoch=2, step=17, best_rsum=301.5)
    path = save_checkpoint(tmp_path / "ck.pt", payload)
    loaded = load_model(path)
    assert loaded.model_name == "sgr" and not loaded.model.training
    assert loaded.vocab == vocab
    assert loaded.config == model.config.to_dict()
    assert loaded.info["step"] == 17 and loaded.info["best_rsum"] == 301.5
    assert loaded.info["format_version"] == FORMAT_VERSION
    feats, ids, lengths = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.model(feats, ids, lengths), model(feats, ids, lengths))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_minimal_converted_form_loads(tmp_path):
    """The layout written by the SGRAF converter: format thsrn-model, no version, extra 'source'."""
    model = _model()
    payload = {
        "format": MODEL_FORMAT,
        "model_name": "sgr",
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "vocab": None,
        "source": {"file": "model_best.pth.tar", "epoch": 30},
    }
    path = tmp_path / "converted.pt"
    torch.save(payload, path)
    loaded = load_model(path)
    assert loaded.vocab is None and loaded.info["source"]["epoch"] == 30
    feats, ids, lengths = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.model(feats, ids, lengths), model(feats, ids, lengths))


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_payload(_model(), _vocab()))
    before = path.read_bytes()
    bad = model_payload(_model(), _vocab())
    bad["extra"] = NotPlainData()
    with pytest.raises(CheckpointError, match="plain data"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    # numpy arrays are not weights_only-safe either: refused before anything is written
    bad["extra"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="numpy"):
        save_checkpoint(path, bad)


def test_save_requires_model_keys(tmp_path):
    with pytest.raises(CheckpointError, match="lacks"):
        save_checkpoint(tmp_path / "x.pt", {"state_dict": {}})


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_payload(_model(), _vocab()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_untrusted_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT, "payload": NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="NotPlainData, which is not plain data.*refused") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_layouts_are_named(tmp_path):
    official = tmp_path / "model_best.pth.tar"
    torch.save({"model": [{}, {}, {}], "opt": {"module_name": "SGR"}, "epoch": 3}, official)
    with pytest.raises(CheckpointError, match="official SGRAF layout.*convert_official_checkpoint"):
        load_checkpoint(official)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="not a thsrn checkpoint"):
        load_checkpoint(other)


def test_newer_format_version_is_refused(tmp_path):
    payload = model_payload(_model())
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_mismatched_weights_are_refused(tmp_path):
    payload = model_payload(_model())
    payload["config"] = {**payload["config"], "embed_size": 12}
    path = save_checkpoint(tmp_path / "ck.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
    payload = model_payload(_model())
    payload["config"] = {**payload["config"], "not_an_option": 1}
    path = save_checkpoint(tmp_path / "ck2.pt", payload)
    with pytest.raises(CheckpointError, match="does not build"):
        load_model(path)


def test_resolve_checkpoint_prefers_best(tmp_path):
    with pytest.raises(CheckpointError, match="holds no"):
        resolve_checkpoint(tmp_path)
    payload = model_payload(_model())
    save_checkpoint(tmp_path / "checkpoint_last.pt", payload)
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint_last.pt"
    save_checkpoint(tmp_path / "checkpoint_best.pt", payload)
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint_best.pt"
    assert resolve_checkpoint(tmp_path, "last") == tmp_path / "checkpoint_last.pt"
    assert isinstance(load_model(tmp_path).model, torch.nn.Module)


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), float(np.random.randn())


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    seed_everything(5)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    state = get_rng_state()
    expected = _draw()
    payload = model_payload(_model())
    payload["rng"] = [state]
    path = save_checkpoint(tmp_path / "ck.pt", payload)
    seed_everything(99)
    set_rng_state(load_checkpoint(path)["rng"][0])
    assert _draw() == expected


def test_preserve_rng_isolates_a_block():
    seed_everything(1)
    with preserve_rng():
        _draw()
    first = _draw()
    seed_everything(1)
    assert _draw() == first


def test_load_model_returns_model_on_requested_device(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", model_payload(_model(), _vocab()))
    loaded = load_model(Path(path), device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"
