"""Shared test fixtures: the official test vectors in tests/fixtures."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def channels_last(a: np.ndarray) -> np.ndarray:
    """The fixtures are channels-first (B, C, ...) like the official code."""
    return np.moveaxis(a, 1, -1)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def tiled_fixture_dir(tmp_path_factory) -> Path:
    """cvvae_v1_tiny_tiled ships only its config: its weights are cvvae_v1_tiny's."""
    d = tmp_path_factory.mktemp("v1_tiled")
    shutil.copy(FIXTURES / "cvvae_v1_tiny_tiled" / "config.json", d)
    shutil.copy(FIXTURES / "cvvae_v1_tiny" / "diffusion_pytorch_model.safetensors", d)
    return d
