"""Inflating the SD image VAE into a CV-VAE: a single image encodes the same."""

import jax
import numpy as np
import pytest

import cvvae_jax
from cvvae_jax import inflate, nets_v1
from conftest import FIXTURES, rel_err


@pytest.fixture(scope="module")
def image_vae():
    return cvvae_jax.ImageVAE.from_pretrained(FIXTURES / "sd_vae_tiny")


def images():
    return jax.random.uniform(jax.random.key(0), (2, 48, 64, 3), minval=-1.0, maxval=1.0)


def test_inflated_encoder_posterior_equals_the_image_vae(image_vae, monkeypatch):
    """With the GroupNorm epsilon made equal, the mapping itself is exact."""
    monkeypatch.setattr(nets_v1, "EPS", 1e-6)  # the SD VAE's; CV-VAE v1 uses 1e-5
    video_vae = cvvae_jax.CVVAE.from_image_vae(image_vae)
    x = images()
    ref, got = image_vae.encode(x), video_vae.encode(x[:, None])
    assert got.mean.shape == (2, 1, 6, 8, 4)
    assert rel_err(got.mean[:, 0], ref.mean) < 1e-4
    assert rel_err(got.logvar[:, 0], ref.logvar) < 1e-4


def test_with_the_official_epsilon_the_posterior_stays_close(image_vae):
    video_vae = cvvae_jax.CVVAE.from_image_vae(image_vae)
    x = images()
    ref, got = image_vae.encode(x), video_vae.encode(x[:, None])
    assert rel_err(got.mean[:, 0], ref.mean) < 1e-3
    assert rel_err(got.logvar[:, 0], ref.logvar) < 1e-3


def test_kernels_sit_on_the_current_frame_tap(image_vae):
    video_vae = cvvae_jax.CVVAE.from_image_vae(image_vae)
    sd2, sd3 = image_vae.state_dict(), video_vae.state_dict()
    conv1 = sd3["encoder.down.0.block.0.conv1.weight"]  # causal: front-padded, last tap
    np.testing.assert_array_equal(conv1[:, :, 2], sd2["encoder.down_blocks.0.resnets.0.conv1.weight"])
    assert not conv1[:, :, :2].any()
    dec = sd3["decoder.up.3.block.0.conv1.weight"]  # symmetric padding: centre tap
    np.testing.assert_array_equal(dec[:, :, 1], sd2["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert not dec[:, :, [0, 2]].any()
    up = sd3["decoder.up.3.upsample.conv.weight"]  # time-doubling: both output frames
    two_d = sd2["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    np.testing.assert_array_equal(up[:, :, 1], np.concatenate([two_d, two_d]))
    np.testing.assert_array_equal(sd3["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
                                  sd2["encoder.mid_block.attentions.0.to_q.weight"])


def test_inflated_model_runs_on_video(image_vae):
    video_vae = cvvae_jax.CVVAE.from_image_vae(image_vae, en_de_n_frames_a_time=None,
                                               tile_spatial_size=None)
    x = jax.random.uniform(jax.random.key(1), (1, 9, 48, 64, 3), minval=-1.0, maxval=1.0)
    z = video_vae.encode(x).mode()
    assert z.shape == (1, 3, 6, 8, 4)
    assert video_vae.decode(z).shape == x.shape


def test_full_size_sd21_config_inflates_to_the_official_v1_widths():
    sd21 = cvvae_jax.ImageVAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4)
    cfg = inflate.config_from_image_vae(sd21)
    reference = cvvae_jax.CVVAEConfig.from_json(
        FIXTURES / "reference" / "cvvae_v1_default_config.json")
    assert cfg == reference
