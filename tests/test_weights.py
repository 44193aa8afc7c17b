"""Official-layout weights: round trips, full-size key/shape layout, load errors."""

import ast
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import cvvae_jax
from cvvae_jax import weights
from conftest import FIXTURES

V1 = FIXTURES / "cvvae_v1_tiny"


def read_tsv(name):
    rows = (FIXTURES / "reference" / name).read_text().splitlines()[1:]
    return {k: tuple(ast.literal_eval(s)) for k, s in (r.split("\t") for r in rows)}


def zero_model(config):
    """A full-size model with zero parameters: the layout without the init cost."""
    graphdef, abstract = nnx.split(cvvae_jax.CVVAE.abstract(config))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    return nnx.merge(graphdef, state)


def test_full_size_v1_writes_the_official_keys_and_shapes(tmp_path):
    config = cvvae_jax.CVVAEConfig.from_json(FIXTURES / "reference" / "cvvae_v1_default_config.json")
    vae = zero_model(config)
    assert round(vae.num_params() / 1e6, 1) == 182.4
    vae.save_pretrained(tmp_path, dtype=np.float16)
    with safe_open(str(tmp_path / weights.WEIGHTS_NAME), "np") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == read_tsv("cvvae_v1_state_dict.tsv")
    saved = json.loads((tmp_path / "config.json").read_text())
    reference = json.loads((FIXTURES / "reference" / "cvvae_v1_default_config.json").read_text())
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == reference
    assert saved["_class_name"] == "CVVAEModel"


def test_full_size_sd3_has_the_official_keys_and_shapes():
    config = cvvae_jax.CVVAESD3Config.from_json(
        FIXTURES / "reference" / "cvvae_sd3_default_config.json")
    abstract = nnx.state(cvvae_jax.CVVAE.abstract(config))
    assert weights.expected_torch_shapes(abstract) == read_tsv("cvvae_sd3_state_dict.tsv")


@pytest.mark.parametrize("cls,name", [(cvvae_jax.CVVAE, "cvvae_v1_tiny"),
                                      (cvvae_jax.CVVAE, "cvvae_sd3_tiny"),
                                      (cvvae_jax.ImageVAE, "sd_vae_tiny")])
def test_save_load_round_trip_is_bit_exact(tmp_path, cls, name):
    vae = cls.from_pretrained(FIXTURES / name)
    vae.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    a, b = vae.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    original = json.loads((FIXTURES / name / "config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text()) == original
    # The fixture is float16; our float32 copy holds the same values exactly.
    with safe_open(str(FIXTURES / name / weights.WEIGHTS_NAME), "np") as f:
        for k in f.keys():
            np.testing.assert_array_equal(f.get_tensor(k).astype(np.float32), a[k], err_msg=k)


def test_hugging_face_subfolder_layout(tmp_path):
    shutil.copytree(V1, tmp_path / "vae3d")
    vae = cvvae_jax.CVVAE.from_pretrained(tmp_path, subfolder="vae3d")
    assert vae.config.ch == 32
    with pytest.raises(FileNotFoundError, match=r"subfolder to one of \['vae3d'\]"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"vae3d_sd3; set the subfolder to one of \['vae3d'\]"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path, subfolder="vae3d_sd3")
    # Subfolders of other models are not offered (a Stable Diffusion repo holds vae/, unet/...).
    shutil.copytree(FIXTURES / "sd_vae_tiny", tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae3d_sd3; set the subfolder to one of \['vae3d'\]$"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path, subfolder="vae3d_sd3")
    with pytest.raises(FileNotFoundError, match=r"set the subfolder to one of \['vae'\]$"):
        cvvae_jax.ImageVAE.from_pretrained(tmp_path)
    shutil.copytree(FIXTURES / "sd_vae_tiny", tmp_path / "sd" / "vae")
    with pytest.raises(FileNotFoundError, match=r"subfolders hold other models \(vae: AutoencoderKL\), "
                                                r"not a CVVAEModel or CVVAESD3Model$"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match="holds a model itself: leave the subfolder out"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path / "vae3d", subfolder="vae3d")
    with pytest.raises(FileNotFoundError, match=r"config.json is a file; pass the model directory"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path / "vae3d" / "config.json")


def test_from_pretrained_picks_the_variant_from_class_name():
    assert isinstance(cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_sd3_tiny").config,
                      cvvae_jax.CVVAESD3Config)
    with pytest.raises(ValueError, match="holds a AutoencoderKL"):
        cvvae_jax.CVVAE.from_pretrained(FIXTURES / "sd_vae_tiny")


def test_configs_built_by_hand_are_checked():
    # Chunks of 6 frames are not whole latent frames: the encode gave latents one frame short.
    with pytest.raises(ValueError, match="en_de_n_frames_a_time=6 must be a positive multiple"):
        cvvae_jax.CVVAEConfig(en_de_n_frames_a_time=6)
    config = cvvae_jax.CVVAEConfig()
    with pytest.raises(ValueError, match="tiles of 100 px"):
        config.replace(tile_spatial_size=100)
    with pytest.raises(TypeError, match=r"is a dict; CVVAE takes one of .*CVVAEConfig.from_dict\(d\)"):
        cvvae_jax.CVVAE.from_config({"ch": 32})


def test_dtypes_are_checked_when_the_model_is_built():
    assert cvvae_jax.CVVAE.from_pretrained(V1, dtype="bf16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"dtype 'int8': expected one of float32, bfloat16"):
        cvvae_jax.CVVAE.from_pretrained(V1, dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"param_dtype 'int32': expected one of float32, bfloat16, float16"):
        cvvae_jax.ImageVAE.abstract(cvvae_jax.ImageVAEConfig(), param_dtype="int32")


def _copy_with(tmp_path, state_dict=None, config=None):
    shutil.copy(V1 / "config.json", tmp_path)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if state_dict is not None:
        weights.write_safetensors(tmp_path / weights.WEIGHTS_NAME, state_dict)
    return tmp_path


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = cvvae_jax.CVVAE.from_pretrained(V1).state_dict()
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(weights.WeightsError,
                       match=r"missing keys \(1\): decoder.conv_out.bias; "
                             r"unexpected keys \(1\): decoder.extra.weight"):
        cvvae_jax.CVVAE.from_pretrained(_copy_with(tmp_path, sd))


def test_shape_mismatch_names_the_key(tmp_path):
    sd = cvvae_jax.CVVAE.from_pretrained(V1).state_dict()
    sd["encoder.conv_in.bias"] = np.zeros(7, np.float32)
    with pytest.raises(weights.WeightsError, match=r"encoder.conv_in.bias has shape \(7,\), "
                                                   r"the model expects \(32,\)"):
        cvvae_jax.CVVAE.from_pretrained(_copy_with(tmp_path, sd))


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cvvae_jax.CVVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="Hugging Face repo id"):
        cvvae_jax.CVVAE.from_pretrained("AILab-CVC/CV-VAE", subfolder="vae3d")
    d = _copy_with(tmp_path)
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        cvvae_jax.CVVAE.from_pretrained(d)
    blob = (V1 / weights.WEIGHTS_NAME).read_bytes()
    for bad in (blob[:100], blob[: len(blob) // 2], b"not a safetensors file at all"):
        (d / weights.WEIGHTS_NAME).write_bytes(bad)
        with pytest.raises(weights.WeightsError, match="corrupt or truncated"):
            cvvae_jax.CVVAE.from_pretrained(d)


def test_configs_built_by_hand_are_checked_like_files():
    with pytest.raises(ValueError, match="CVVAEModel ch='32': expected int"):
        cvvae_jax.CVVAEConfig(ch="32")
    with pytest.raises(ValueError, match="AutoencoderKL latent_channels=0 must be >= 1"):
        cvvae_jax.ImageVAEConfig(latent_channels=0)
    # Lists, as JSON has them, become tuples: the config is hashed as static model structure.
    config = cvvae_jax.CVVAEConfig(ch=32, ch_mult=[1, 1, 2, 2], attn_resolutions=[4])
    assert config.ch_mult == (1, 1, 2, 2) and config.attn_resolutions == (4,)
    assert hash(config) == hash(config.replace(ch_mult=(1, 1, 2, 2)))


@pytest.mark.parametrize("change,message", [
    ({"bogus_option": 1}, "unknown CVVAEModel config option"),
    ({"dropout": 0.1}, "dropout=0.1 is not supported"),
    ({"encoder_attn_type": "linear"}, "encoder_attn_type='linear' is not supported"),
    ({"time_n_compress": 8}, "compresses time by 4"),
    ({"en_de_n_frames_a_time": 6}, "multiple of time_n_compress=4"),
    ({"tile_spatial_size": 36}, "multiples of 8"),
    ({"double_z": False}, "double_z=False"),
    ({"reshape_x_dim_to_4": True}, "reshape_x_dim_to_4"),
    ({"_class_name": "Unknown"}, "_class_name='Unknown'"),
    ({"ch_mult": 3}, r"CVVAEModel ch_mult=3: expected tuple\[int, ...\]"),
    ({"causal_encoder": "yes"}, "causal_encoder='yes': expected bool"),
    ({"tile_spatial_size": 32.5}, r"tile_spatial_size=32.5: expected int \| None"),
    ({"z_channels": 0}, "CVVAEModel z_channels=0 must be >= 1"),
    ({"ch_mult": [1, 0, 2, 2]}, r"CVVAEModel ch_mult=\(1, 0, 2, 2\) must be >= 1"),
    ([], "expected a JSON object of config options, got a list"),
])
def test_bad_config_options_are_rejected(tmp_path, change, message):
    config = change if isinstance(change, list) else json.loads((V1 / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        cvvae_jax.CVVAE.from_pretrained(_copy_with(tmp_path, config=config))


def test_diffusers_loads_our_saved_image_vae_unchanged(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    vae = cvvae_jax.ImageVAE.from_pretrained(FIXTURES / "sd_vae_tiny")
    vae.save_pretrained(tmp_path)
    ref, info = diffusers.AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == []
    io = np.load(FIXTURES / "sd_vae_tiny" / "io.npz")
    with torch.no_grad():
        mean = ref.eval().encode(torch.tensor(io["image_input"])).latent_dist.mean.numpy()
    np.testing.assert_allclose(mean, io["image_mean"], atol=1e-5)
