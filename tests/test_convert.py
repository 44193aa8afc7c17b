"""Tests for cvvae_jax.convert and the Orbax layout: bit-exact round trips, clean CLI errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from cvvae_jax import CVVAE, weights
from conftest import FIXTURES, channels_last

REPO = Path(__file__).resolve().parents[1]
# (fixture, class name, tensors, summary of parameters and float32 bytes)
CASES = {
    "cvvae_v1_tiny": ("CVVAEModel", 186, "2.3M parameters, 9.2 MB"),
    "sd_vae_tiny": ("AutoencoderKL", 244, "1.4M parameters, 5.6 MB"),
}


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "cvvae_jax.convert", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO)


def fixture_tensors(name: str) -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / name / weights.WEIGHTS_NAME))


def public_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def assert_summary(result, name: str, dst: Path, nbytes: str | None = None):
    class_name, tensors, sizes = CASES[name]
    if nbytes:
        sizes = sizes.rsplit(", ", 1)[0] + f", {nbytes}"
    assert result.returncode == 0, result.stderr
    pattern = (rf"converted {class_name}: {tensors} tensors, {re.escape(sizes)} "
               rf"-> {re.escape(str(dst))} \(\d+\.\d s\)")
    assert re.fullmatch(pattern, result.stdout.strip()), result.stdout


@pytest.fixture(scope="module")
def orbax_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every CLI case converted to Orbax once, shared by the to-pytorch tests."""
    dirs = {}
    for name in CASES:
        dst = tmp_path_factory.mktemp("orbax") / name
        result = run_cli("to-orbax", FIXTURES / name, dst)
        assert_summary(result, name, dst)
        assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params"]
        dirs[name] = dst
    return dirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_round_trip_gives_back_the_fixture(name, orbax_dirs, tmp_path):
    dst = tmp_path / "pt"
    assert_summary(run_cli("to-pytorch", orbax_dirs[name], dst), name, dst)

    original, converted = fixture_tensors(name), load_file(str(dst / weights.WEIGHTS_NAME))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in original.items()}
    for key, value in original.items():
        assert converted[key].dtype == np.float32, key
        np.testing.assert_array_equal(converted[key], value.astype(np.float32), err_msg=key)

    config = json.loads((dst / weights.CONFIG_NAME).read_text())
    expected = json.loads((FIXTURES / name / weights.CONFIG_NAME).read_text())
    assert public_options(config) == public_options(expected)
    assert config["_class_name"] == expected["_class_name"] == CASES[name][0]


def test_cli_float16_is_bit_exact(orbax_dirs, tmp_path):
    dst = tmp_path / "pt16"
    result = run_cli("to-pytorch", orbax_dirs["cvvae_v1_tiny"], dst, "--dtype", "float16")
    assert_summary(result, "cvvae_v1_tiny", dst, nbytes="4.6 MB")
    original = fixture_tensors("cvvae_v1_tiny")
    converted = load_file(str(dst / weights.WEIGHTS_NAME))
    assert sorted(converted) == sorted(original)
    for key, value in original.items():
        assert converted[key].dtype == np.float16, key
        np.testing.assert_array_equal(converted[key].view(np.uint16), value.view(np.uint16),
                                      err_msg=key)


def test_orbax_round_trip_is_bit_exact_for_sd3(tmp_path):
    model = CVVAE.from_pretrained(FIXTURES / "cvvae_sd3_tiny")
    model.save_orbax(tmp_path / "orbax")
    restored = CVVAE.from_pretrained(tmp_path / "orbax")

    assert restored.config == model.config
    assert restored.config.to_dict() == model.config.to_dict()
    before = dict(weights.params_of(nnx.state(model)))
    after = dict(weights.params_of(nnx.state(restored)))
    assert len(after) == len(before) == 176
    for path, var in before.items():
        a, b = np.asarray(var.get_value()), np.asarray(after[path].get_value())
        assert b.dtype == a.dtype == np.float32, path
        np.testing.assert_array_equal(b, a, err_msg=str(path))
        # Placed like the safetensors path places them, free to follow a jit's shardings.
        assert not after[path].get_value().committed, path

    # The abstract target decides the dtype: Orbax casts while reading.
    as_bf16 = CVVAE.from_pretrained(tmp_path / "orbax", param_dtype=jnp.bfloat16)
    for path, var in weights.params_of(nnx.state(as_bf16)):
        value = var.get_value()
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(value),
                                      np.asarray(before[path].get_value()).astype(jnp.bfloat16))


def test_orbax_model_encodes_like_the_safetensors_model(orbax_dirs):
    io = np.load(FIXTURES / "cvvae_v1_tiny" / "io.npz")
    video = channels_last(io["video_input"])
    from_safetensors = CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny").encode(video).mean
    from_orbax = CVVAE.from_pretrained(orbax_dirs["cvvae_v1_tiny"]).encode(video).mean
    np.testing.assert_array_equal(np.asarray(from_orbax), np.asarray(from_safetensors))
    # ... and both are the official posterior, not merely equal to each other.
    np.testing.assert_allclose(np.asarray(from_orbax), channels_last(io["video_mean"]), atol=1e-5)


def _missing_src(tmp_path):
    return ["to-orbax", tmp_path / "does-not-exist", tmp_path / "out"], "no such directory"


def _dst_not_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a model")
    return ["to-orbax", FIXTURES / "cvvae_v1_tiny", tmp_path / "out"], "--overwrite"


def _truncated_weights(tmp_path):
    src = tmp_path / "truncated"
    src.mkdir()
    fixture = FIXTURES / "cvvae_v1_tiny"
    (src / weights.CONFIG_NAME).write_bytes((fixture / weights.CONFIG_NAME).read_bytes())
    head = (fixture / weights.WEIGHTS_NAME).read_bytes()[:100]
    (src / weights.WEIGHTS_NAME).write_bytes(head)
    return ["to-orbax", src, tmp_path / "out"], "corrupt or truncated"


@pytest.mark.parametrize("case", [_missing_src, _dst_not_empty, _truncated_weights],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_cli_failures_are_one_line(case, tmp_path):
    args, reason = case(tmp_path)
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert reason in lines[0]
    assert result.stdout == ""
    # A failed conversion writes nothing.
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) in ([], ["notes.txt"])


def test_bin_weights_load_like_safetensors_and_need_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    src = FIXTURES / "cvvae_v1_tiny"
    (tmp_path / weights.CONFIG_NAME).write_bytes((src / weights.CONFIG_NAME).read_bytes())
    torch.save({k: torch.from_numpy(v) for k, v in fixture_tensors("cvvae_v1_tiny").items()},
               tmp_path / weights.BIN_NAME)

    from_bin = CVVAE.from_pretrained(tmp_path).state_dict()
    from_safetensors = CVVAE.from_pretrained(src).state_dict()
    assert sorted(from_bin) == sorted(from_safetensors)
    for key, value in from_safetensors.items():
        np.testing.assert_array_equal(from_bin[key], value, err_msg=key)

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(weights.WeightsError, match="needs torch"):
        CVVAE.from_pretrained(tmp_path)


def test_orbax_params_for_another_config_name_the_differences(tmp_path):
    """An Orbax dir whose config.json no longer fits its params/: same checks as safetensors."""
    CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny").save_orbax(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["z_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError,
                       match=r"the Orbax parameters in .*: decoder.conv_in.weight has shape "
                             r"\(64, 4, 3, 3, 3\), the model expects \(64, 8, 3, 3, 3\)"):
        CVVAE.from_pretrained(tmp_path)
    config["num_res_blocks"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match=r"missing keys \(\d+\): decoder.up.0.block.2"):
        CVVAE.from_pretrained(tmp_path)
