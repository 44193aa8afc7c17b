"""Tests for cvvae_jax.convert and the Orbax layout: bit-exact round trips, train.py
checkpoints to the official layout, clean CLI errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import train_config
from flax import nnx
from safetensors.numpy import load_file

from cvvae_jax import CVVAE, CVVAEConfig, convert, weights
from cvvae_jax.discriminator import (
    NLayerDiscriminator3D,
    kwargs_from_official,
    load_discriminator_state,
)
from cvvae_jax.inflate import config_from_image_vae
from cvvae_jax.model_config import load_config
from cvvae_jax.run_checkpoint import RunCheckpointer
from cvvae_jax.train_step import init_state, optimizers
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
    # safetensors alone creates 0600 files, which others sharing the model could not read.
    umask = os.umask(0)
    os.umask(umask)
    assert (dst / weights.WEIGHTS_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


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


# -- train.py checkpoints ------------------------------------------------------------------


def _filled(abstract_module, seed: int) -> nnx.State:
    """The module's parameters set to distinct numbers, with no init to compile."""
    rng = np.random.default_rng(seed)
    _, abstract = nnx.split(abstract_module)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), abstract)


@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory):
    """A train.py workdir holding step 7 of tests/train_config.py's run, EMA != raw."""
    config = train_config.get_config()
    model_config = CVVAEConfig.from_dict(dict(config.model.config))
    abstract_vae = CVVAE.abstract(model_config)
    vae = _filled(abstract_vae, seed=0)
    disc = _filled(nnx.eval_shape(lambda: NLayerDiscriminator3D(**config.disc, rngs=nnx.Rngs(0))),
                   seed=1)
    g_tx, d_tx = optimizers(g_schedule=optax.constant_schedule(1e-3),
                            d_schedule=optax.constant_schedule(1e-3), b1=0.9, b2=0.98, eps=1e-4,
                            weight_decay=0.01, grad_clip=1.0)
    state = init_state(vae, disc, g_tx=g_tx, d_tx=d_tx)
    state = state._replace(ema=_filled(abstract_vae, seed=2))
    workdir = tmp_path_factory.mktemp("run")
    with RunCheckpointer(workdir / "checkpoints", save_every=1, keep_last=2,
                         config=config.to_dict(), async_save=False) as ckpt:
        ckpt.maybe_save(7, state, {"position": 7}, force=True)
    return workdir, model_config, state


def _convert_in_process(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.run replaces it
    return convert.main([str(a) for a in args])


def _assert_params_equal(state: nnx.State, expected: nnx.State) -> None:
    got, want = dict(weights.params_of(state)), dict(weights.params_of(expected))
    assert sorted(got) == sorted(want)
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))


@pytest.mark.parametrize("params", ["ema", "raw"])
def test_training_checkpoint_to_pytorch(params, train_checkpoint, tmp_path, capsys, monkeypatch):
    workdir, model_config, state = train_checkpoint
    dst = tmp_path / "pt"
    # The workdir converts its newest step; --params ema is also the default.
    src, flags = ((workdir, []) if params == "ema"
                  else (workdir / "checkpoints" / "7", ["--params", "raw"]))
    assert _convert_in_process(monkeypatch, "to-pytorch", src, dst, *flags) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"converted CVVAEModel: 96 tensors, 469.4k parameters, 1.9 MB -> "
                        rf"{re.escape(str(dst))} \(\d+\.\d s\)", lines[0]), lines
    assert lines[1:] == [
        f"from the {params} parameters of checkpoint step 7 in {workdir / 'checkpoints'}",
        f"discriminator: 28 tensors, 147.4k parameters, 589.7 kB -> "
        f"{dst / convert.DISC_WEIGHTS_NAME}"]
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "discriminator.safetensors",
        "discriminator_config.json"]

    vae = CVVAE.from_pretrained(dst)
    assert vae.config == model_config
    _assert_params_equal(nnx.state(vae), state.ema if params == "ema" else state.gen["vae"])

    disc_config = json.loads((dst / convert.DISC_CONFIG_NAME).read_text())
    assert disc_config == {"input_nc": 3, "ndf": 32, "n_layers": 0, "use_actnorm": False,
                           "half_3d": False, "causal": False}
    disc = nnx.eval_shape(lambda: NLayerDiscriminator3D(**kwargs_from_official(disc_config),
                                                        rngs=nnx.Rngs(0)))
    load_discriminator_state(disc, dst / convert.DISC_WEIGHTS_NAME)
    _assert_params_equal(nnx.state(disc), state.disc)


def test_model_config_of_an_inflated_run_comes_from_its_image_vae():
    config = train_config.get_config()
    config.inflate, config.image_vae.path = True, str(FIXTURES / "sd_vae_tiny")
    config.model.config = {"en_de_n_frames_a_time": 8}  # kept: inflation cannot derive it
    got = convert.checkpoint_model_config(ml_collections.ConfigDict(config.to_dict()))
    image_config = load_config(FIXTURES / "sd_vae_tiny" / weights.CONFIG_NAME)
    assert got == config_from_image_vae(image_config, en_de_n_frames_a_time=8)
    assert (got.ch, got.ch_mult, got.z_channels, got.en_de_n_frames_a_time) == \
        (32, (1, 1, 2, 2), 4, 8)

    config.image_vae.path = "/gone/image_vae"
    with pytest.raises(FileNotFoundError, match=r"no such directory: /gone/image_vae; .* "
                                                r"pass --model-config"):
        convert.checkpoint_model_config(ml_collections.ConfigDict(config.to_dict()))


# A failed TensorStore read leaves callbacks hitting Orbax's closed event loop, harmlessly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["missing_workdir", "truncated_arrays"])
def test_bad_training_checkpoint_is_one_line(damage, train_checkpoint, tmp_path, capsys,
                                             monkeypatch):
    src = tmp_path / "run"
    if damage == "truncated_arrays":
        shutil.copytree(train_checkpoint[0], src)
        array_files = list((src / "checkpoints" / "7" / "state").rglob("d/*"))
        assert array_files
        for p in array_files:
            os.truncate(p, p.stat().st_size // 2)
    assert _convert_in_process(monkeypatch, "to-pytorch", src, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    reason = ("no such directory" if damage == "missing_workdir"
              else "could not read the parameters in")
    assert lines[0].startswith("error: ") and reason in lines[0]
    assert not (tmp_path / "out").exists()


def test_saving_one_format_over_the_other_leaves_one_model(tmp_path):
    v1 = CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    sd3 = CVVAE.from_pretrained(FIXTURES / "cvvae_sd3_tiny")
    v1.save_orbax(tmp_path)
    sd3.save_pretrained(tmp_path, dtype="fp16")  # short dtype names, as everywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", weights.WEIGHTS_NAME]
    assert CVVAE.from_pretrained(tmp_path).config == sd3.config  # not the stale Orbax v1
    v1.save_orbax(tmp_path)
    assert not (tmp_path / weights.WEIGHTS_NAME).exists()
    assert CVVAE.from_pretrained(tmp_path).config == v1.config
    with pytest.raises(ValueError, match=r"dtype 'int8': expected one of float32, bfloat16, float16"):
        v1.save_pretrained(tmp_path / "int8", dtype=np.int8)
    assert not (tmp_path / "int8").exists()
