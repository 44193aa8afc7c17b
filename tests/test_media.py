"""Tests for cvvae_jax.media and the bundled assets: real encode/decode through PyAV."""

import numpy as np
import pytest
from PIL import Image

from cvvae_jax import assets, media
from cvvae_jax.data import testing


def _gradient_video(t=12, h=64, w=96):
    """Smooth colour ramps drifting over time: what H.264 at CRF 23 keeps well."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 255.0 * xx / (w - 1)
    g = 255.0 * yy / (h - 1)
    b = 127.5 + 100.0 * np.sin(2 * np.pi * (xx / w + tt / t))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def _mean_abs_error(a, b):
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()


def test_round_trip_keeps_shape_fps_and_pixels(tmp_path):
    video = _gradient_video()
    path = tmp_path / "gradient.mp4"
    media.write_video(path, video, fps=24)
    decoded, fps = media.read_video(path)
    assert decoded.shape == video.shape
    assert decoded.dtype == np.uint8
    assert fps == 24.0
    # About 2.5 with FFmpeg 7 / x264: mostly chroma lost to 4:2:0 subsampling.
    assert _mean_abs_error(decoded, video) < 4.0


def test_float_frames_are_written_like_their_uint8_version(tmp_path):
    """The encoder gets the same pixels. (Not a comparison of the two files: once, under
    load, two encodes of the same frames decoded to pixels up to 16 apart.)"""
    video = _gradient_video()
    np.testing.assert_array_equal(media._as_uint8_video(media.to_float(video), "test"), video)
    media.write_video(tmp_path / "f32.mp4", media.to_float(video), fps=30)
    decoded, _ = media.read_video(tmp_path / "f32.mp4")
    assert decoded.shape == video.shape
    assert _mean_abs_error(decoded, video) < 4.0


def test_ntsc_rate_survives(tmp_path):
    path = tmp_path / "ntsc.mp4"
    media.write_video(path, _gradient_video(t=4), fps=30000 / 1001)
    _, fps = media.read_video(path)
    assert fps == pytest.approx(29.97003, abs=1e-5)


def test_odd_size_is_padded_to_even_by_edge_replication(tmp_path):
    video = _gradient_video(t=5, h=33, w=47)
    path = tmp_path / "odd.mp4"
    media.write_video(path, video, fps=30)
    decoded, _ = media.read_video(path)
    assert decoded.shape == (5, 34, 48, 3)
    # Higher than for the larger video: 4:2:0 chroma blurs more of a small picture.
    assert _mean_abs_error(decoded[:, :33, :47], video) < 6.0
    # The added row/column repeats its neighbour, so it matches the last real one.
    assert _mean_abs_error(decoded[:, 33, :47], video[:, 32]) < 7.0
    assert _mean_abs_error(decoded[:, :33, 47], video[:, :, 46]) < 7.0


def test_read_video_start_stride_max_frames_select_decoded_frames(tmp_path):
    path = tmp_path / "v.mp4"
    media.write_video(path, _gradient_video(t=12), fps=30)
    full, _ = media.read_video(path)
    part, _ = media.read_video(path, start=2, stride=3, max_frames=3)
    assert part.shape[0] == 3
    np.testing.assert_array_equal(part, full[[2, 5, 8]])
    tail, _ = media.read_video(path, start=10, stride=5)
    np.testing.assert_array_equal(tail, full[[10]])


def test_to_float_and_to_uint8_exact_values():
    np.testing.assert_array_equal(
        media.to_float(np.array([0, 255], np.uint8)), np.array([-1.0, 1.0], np.float32))
    assert media.to_float(np.zeros(3, np.uint8)).dtype == np.float32
    np.testing.assert_array_equal(
        media.to_uint8(np.array([-1.0, 0.0, 1.0])), np.array([0, 128, 255], np.uint8))
    # Out-of-range model outputs clip instead of wrapping around.
    np.testing.assert_array_equal(
        media.to_uint8(np.array([-3.0, -1.01, 1.01, 3.0])), np.array([0, 0, 255, 255], np.uint8))
    every_value = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(media.to_uint8(media.to_float(every_value)), every_value)


def test_to_float_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        media.to_float(np.zeros(3, np.float32))


@pytest.mark.parametrize("name", assets.CLIPS)
def test_bundled_clips_decode(name):
    frames, fps = media.read_video(assets.path(name))
    assert frames.shape == (81, 144, 256, 3)
    assert fps == 30.0
    # Excerpts were chosen for motion (tea pouring, a moving camera): the last frame
    # differs from the first (2.3 and 37 here), where a still scene would give ~0.
    assert _mean_abs_error(frames[-1], frames[0]) > 1.0


@pytest.mark.parametrize("name", assets.IMAGES)
def test_bundled_images_load(name):
    with Image.open(assets.path(name)) as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert image.size == (456, 256)


def test_unknown_asset_lists_available_names():
    with pytest.raises(FileNotFoundError, match="clip_a.mp4.*image_0.jpg"):
        assets.path("clip_c.mp4")
    with pytest.raises(FileNotFoundError, match="no bundled asset"):
        assets.path("../media.py")


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_clip.mp4"):
        media.read_video(tmp_path / "missing_clip.mp4")


def test_zero_byte_file_error_names_the_file(tmp_path):
    path = tmp_path / "zero_bytes.mp4"
    path.touch()
    with pytest.raises(ValueError, match="zero_bytes.mp4"):
        media.read_video(path)


def test_garbage_file_error_names_the_file(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"this is not a video file " * 64)
    with pytest.raises(ValueError, match="cannot decode .*garbage.mp4"):
        media.read_video(path)


def test_no_frames_selected_is_an_error(tmp_path):
    path = tmp_path / "short.mp4"
    media.write_video(path, _gradient_video(t=4), fps=30)
    with pytest.raises(ValueError, match=r"no frames read from .*short.mp4: 4 decodable"):
        media.read_video(path, start=4)


def test_write_video_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        media.write_video(tmp_path / "x.mp4", np.zeros((4, 8, 8), np.uint8), fps=30)
    with pytest.raises(ValueError, match="no frames"):
        media.write_video(tmp_path / "x.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=30)


def test_side_by_side_puts_white_separator_between_videos():
    a = np.full((3, 10, 6, 3), 10, np.uint8)
    b = media.to_float(np.full((3, 10, 5, 3), 200, np.uint8))
    joined = media.side_by_side(a, b)
    assert joined.shape == (3, 10, 6 + 4 + 5, 3)
    assert (joined[:, :, :6] == 10).all()
    assert (joined[:, :, 6:10] == 255).all()
    assert (joined[:, :, 10:] == 200).all()
    with pytest.raises(ValueError, match="video 1 has 2 frames"):
        media.side_by_side(a, a[:2])


def test_enlarge_repeats_whole_pixels_up_to_the_height():
    video = np.arange(2 * 3 * 2 * 1).reshape(2, 3, 2, 1)
    big = media.enlarge(video, 8)  # 3 px tall: a factor of 3 reaches 9 >= 8
    assert big.shape == (2, 9, 6, 1)
    np.testing.assert_array_equal(big[:, ::3, ::3], video)
    np.testing.assert_array_equal(big[:, 2::3, 2::3], video)
    assert media.enlarge(video, 3).shape == video.shape


def test_frame_grid_png_layout_and_content(tmp_path):
    # Frame t is filled with the value 10 * t, so each tile shows which frame it took.
    video = np.broadcast_to(
        (10 * np.arange(9, dtype=np.uint8))[:, None, None, None], (9, 16, 24, 3))
    path = tmp_path / "grid.png"
    media.frame_grid_png(path, [video, video[:5]], n_frames=3)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 24 + 2 * 4, 2 * 16 + 4)
        grid = np.asarray(image.convert("RGB"))
    tile_values = [[grid[row * 20 + 8, col * 28 + 12, 0] for col in range(3)] for row in range(2)]
    assert tile_values == [[0, 40, 80], [0, 20, 40]]
    assert (grid[16:20] == 255).all()  # separator between the two rows


def test_frame_grid_png_labels_add_a_left_strip(tmp_path):
    video = np.zeros((4, 16, 24, 3), np.uint8)
    path = tmp_path / "labelled.png"
    media.frame_grid_png(path, [video, video], n_frames=2, labels=["input", "recon"])
    with Image.open(path) as image:
        width, height = image.size
        grid = np.asarray(image.convert("RGB"))
    strip = width - (2 * 24 + 4)
    assert height == 2 * 16 + 4
    assert strip > 20
    # Black text on the white strip; the frames start right after it.
    assert grid[:, :strip].min() < 128
    assert (grid[:16, strip:strip + 24] == 0).all()
    assert (grid[20:, strip:strip + 24] == 0).all()
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        media.frame_grid_png(path, [video, video], labels=["only one"])


@pytest.mark.parametrize("rotation,box", [
    (-90, ((0, 24), (7, 31))),  # a phone's portrait video: turned clockwise, top left -> top right
    (90, ((40, 0), (47, 7))),
    (180, ((24, 40), (31, 47))),
])
def test_display_rotation_is_applied_as_players_do(tmp_path, rotation, box):
    testing.write_corner_video(tmp_path / "phone.mp4", 2, size=(32, 48), rotation=rotation)
    frames, _ = media.read_video(tmp_path / "phone.mp4")
    assert frames.shape == ((2, 32, 48, 3) if rotation == 180 else (2, 48, 32, 3))
    assert testing.white_box(frames[0]) == box
