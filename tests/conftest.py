"""Shared test fixtures: the official test vectors in tests/fixtures."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# XLA:CPU options for a test's own jit of a large graph that runs once or twice: they
# cut compile time 2-4x and make the compiled code up to ~2x slower, with the same
# numbers. Tests that run many steps keep the defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}


def xla_flags(options: dict) -> str:
    """The same options as an XLA_FLAGS string, for subprocesses."""
    return " ".join(f"--{k}={str(v).lower()}" for k, v in options.items())


def channels_last(a: np.ndarray) -> np.ndarray:
    """The fixtures are channels-first (B, C, ...) like the official code."""
    return np.moveaxis(a, 1, -1)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def all_eqns(jaxpr):
    """Every equation of jaxpr, those of its nested jaxprs (loops, custom VJPs) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def convolutions_and_dots(jaxpr) -> list[tuple[str, str, str, int, int]]:
    """(primitive, operand dtype, accumulation dtype, operand's last axis, operand's rank) of
    every conv and dot, nested jaxprs included."""
    found = []
    for eqn in all_eqns(jaxpr):
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            lhs = eqn.invars[0].aval
            acc = eqn.params.get("preferred_element_type")
            found.append((eqn.primitive.name, str(lhs.dtype), str(acc), lhs.shape[-1], lhs.ndim))
    return found


@pytest.fixture(scope="session")
def tiled_fixture_dir(tmp_path_factory) -> Path:
    """cvvae_v1_tiny_tiled ships only its config: its weights are cvvae_v1_tiny's."""
    d = tmp_path_factory.mktemp("v1_tiled")
    shutil.copy(FIXTURES / "cvvae_v1_tiny_tiled" / "config.json", d)
    shutil.copy(FIXTURES / "cvvae_v1_tiny" / "diffusion_pytorch_model.safetensors", d)
    return d


@pytest.fixture
def cpu_bf16_dots(monkeypatch):
    """Takes the CPU for one with the bf16 dot products given (`shifted_matmul.bf16_dot_flag`:
    "amx_bf16", "avx512_bf16" or None), whatever it has: that flag picks the bf16 conv forms
    when a model's call is traced, so the models' jit cache is cleared at each change and
    after the test."""
    from cvvae_jax import shifted_matmul
    from cvvae_jax.pretrained import jitted_part

    def take(flag):
        monkeypatch.setattr(shifted_matmul, "bf16_dot_flag", lambda: flag)
        jitted_part.cache_clear()
    yield take
    jitted_part.cache_clear()
