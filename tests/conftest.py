"""Shared pytest setup: single-threaded torch (the CI machine has 2 cores), seeded RNGs, shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "scan_captions"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def scan_captions_dir() -> Path:
    """The real SCAN caption and vocab files (../shared/data/scan_captions); skipped if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real SCAN caption files not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scenes_tiny(tmp_path_factory) -> Path:
    """The Scenes ``tiny`` preset, generated once per test session (seed 0)."""
    from thsrn_lib.data.scenes import generate

    return Path(generate(preset="tiny", out=tmp_path_factory.mktemp("scenes"), seed=0))
