"""Chunk and tile geometry, stitching, causality and one compile per shape."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cvvae_jax
from cvvae_jax import layers, tiling
from cvvae_jax.pretrained import jitted_part
from conftest import FIXTURES, channels_last


def test_chunk_bounds_match_the_official_loop():
    assert tiling.chunk_bounds(13, 4) == [(0, 5), (4, 9), (8, 13)]
    assert tiling.chunk_bounds(17, 16) == [(0, 17)]
    assert tiling.chunk_bounds(21, 16) == [(0, 17), (16, 21)]
    assert tiling.chunk_bounds(1, 4) == [(0, 1)]
    assert tiling.chunk_bounds(9, None) == [(0, 9)]


def test_tile_geometry_matches_the_official_loop():
    assert tiling.tile_starts(96, 24, 32) == [0, 24, 48, 72]
    assert tiling.tile_starts(80, 24, 32) == [0, 24, 48]
    assert tiling.tile_starts(20, 24, 32) == [0]
    # The released configs: 576 px tiles, overlap ratio 0.2222.
    assert tiling.TilePlan.for_encode(576, 8, 0.2222) == tiling.TilePlan(576, 448, 16, 56)
    assert tiling.TilePlan.for_decode(576, 8, 0.2222) == tiling.TilePlan(72, 56, 128, 448)


def test_identity_tiles_stitch_back_to_the_input():
    """Blending equal overlaps and cropping must reassemble the array exactly."""
    x = jnp.arange(2 * 3 * 11 * 13 * 2, dtype=jnp.float32).reshape(2, 3, 11, 13, 2)
    plan = tiling.TilePlan(tile_in=5, stride_in=3, overlap_out=2, stride_out=3)
    np.testing.assert_allclose(tiling.tiled(lambda t: t, x, plan), x, rtol=1e-6)
    np.testing.assert_array_equal(tiling.chunked(lambda c: c, x, 1), x)


def test_blend_is_a_linear_ramp_from_the_previous_tile():
    a = jnp.full((1, 1, 1, 4, 1), 10.0)
    b = jnp.zeros((1, 1, 1, 4, 1))
    out = tiling._blend(a, b, 2, axis=3)
    np.testing.assert_allclose(out[0, 0, 0, :, 0], [10.0, 5.0, 0.0, 0.0])


def test_each_chunk_and_tile_shape_compiles_once(tiled_fixture_dir):
    io = np.load(FIXTURES / "cvvae_v1_tiny_tiled" / "io.npz")
    vae = cvvae_jax.CVVAE.from_pretrained(tiled_fixture_dir)
    graphdef = nnx.split(vae)[0]
    x = channels_last(io["video_input"])  # 13 x 80 x 96: chunks of 5 frames, tiles 32 px
    for _ in range(2):
        z = vae.encode(x).mean
        vae.decode(z)
    # encode: 32x32 and 32x24 tiles; decode: 4x4 and 4x3 latent tiles (2 frames each)
    assert jitted_part(graphdef, "encode_moments")._cache_size() == 2
    assert jitted_part(graphdef, "decode_latents")._cache_size() == 2


def test_calls_reuse_one_split_and_see_new_weight_values(monkeypatch):
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    z = jax.random.normal(jax.random.key(1), (1, 2, 4, 4, 4))
    before = np.asarray(vae.decode(z))
    split = nnx.split
    splits = []
    monkeypatch.setattr(nnx, "split", lambda *a, **k: splits.append(a) or split(*a, **k))
    np.testing.assert_array_equal(np.asarray(vae.decode(z)), before)
    assert splits == []
    _, state = split(vae)
    nnx.update(vae, jax.tree.map(lambda v: v + 0.01, state))
    after = np.asarray(vae.decode(z))
    assert splits == []
    assert np.abs(after - before).max() > 1e-3
    graphdef, state = split(vae)
    np.testing.assert_array_equal(after, jitted_part(graphdef, "decode_latents")(state, z))
    # The cache must not keep the model alive.
    ref = weakref.ref(vae)
    del vae, state
    gc.collect()
    assert ref() is None


def test_causal_conv_never_sees_the_future():
    conv = layers.Conv(2, 3, (3, 3, 3), layers.causal_pads(1, layers.ZEROS), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 6, 8, 8, 2))
    y = conv(x)
    y2 = conv(x.at[:, 4:].set(0.0))
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert np.abs(y[:, 4:] - y2[:, 4:]).max() > 1e-3


def test_single_chunk_and_single_tile_equal_the_whole_clip():
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    x = jax.random.uniform(jax.random.key(0), (1, 9, 32, 32, 3), minval=-1, maxval=1)
    whole = np.asarray(vae.encode(x).mean)
    big = cvvae_jax.CVVAE.from_config(vae.config.replace(en_de_n_frames_a_time=8,
                                                         tile_spatial_size=32,
                                                         tile_overlap_ratio=0.25))
    nnx.update(big, nnx.state(vae))
    np.testing.assert_array_equal(np.asarray(big.encode(x).mean), whole)


def test_chunks_differ_from_the_whole_clip_because_groupnorm_pools_over_time():
    """The official encoder is causal in its convs only: GroupNorm statistics span
    all frames, so even the first latent depends on later frames, and chunked
    encoding (as the official code does it) is not the whole-clip encoding."""
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    x = jax.random.uniform(jax.random.key(0), (1, 9, 32, 32, 3), minval=-1, maxval=1)
    whole = np.asarray(vae.encode(x).mean)
    prefix = np.asarray(vae.encode(x[:, :5]).mean)
    assert np.abs(prefix - whole[:, :2]).max() > 1e-3


def test_progress_is_reported_once_per_piece_in_order():
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    # 9 frames in chunks of 4: 2 chunks; 40x56 in 32 px tiles every 24 px: 2 x 2 tiles.
    vae.config = vae.config.replace(en_de_n_frames_a_time=4, tile_spatial_size=32,
                                    tile_overlap_ratio=0.25)
    x = jax.random.uniform(jax.random.key(0), (1, 9, 40, 56, 3), minval=-1, maxval=1)
    calls = []
    post = vae.encode(x, lambda done, total: calls.append((done, total)))
    assert calls == [(n, 8) for n in range(1, 9)]
    np.testing.assert_array_equal(np.asarray(post.mean), np.asarray(vae.encode(x).mean))
    calls.clear()
    vae.decode(post.mean, lambda done, total: calls.append((done, total)))
    assert calls == [(n, 8) for n in range(1, 9)]  # latent chunks of 1 + 1, 4 x 7 in 4-latent tiles
