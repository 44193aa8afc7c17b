"""`python -m cvvae_jax.demo`: the README's smoke run of the video path, end to end."""

import re

import numpy as np
import pytest
from PIL import Image

from cvvae_jax import demo, media


def test_demo_writes_the_side_by_side_video_and_the_frame_grid(tmp_path, capsys):
    demo.main(["--frames", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "input:       (1, 5, 144, 256, 3)" in out
    assert "latent:      (1, 2, 18, 32, 4)" in out
    # Untrained: far from the input, but not blank or saturated (which sit near 0-6 dB).
    assert 8 < float(re.search(r"PSNR:\s+([\d.]+) dB", out).group(1)) < 20, out

    video, fps = media.read_video(tmp_path / "side_by_side.mp4")
    assert video.shape == (5, 144, 256 + media._SEPARATOR_PX + 256, 3) and fps == 30
    source, _ = media.read_video(demo.assets.path("clip_a.mp4"), max_frames=5)
    # The left half is the input, through one more H.264 encode.
    assert np.abs(video[:, :, :256].astype(int) - source).mean() < 4
    assert Image.open(tmp_path / "frames.png").size[0] > 4 * 256  # GRID_FRAMES frames a row


@pytest.mark.parametrize("frames,error", [
    (6, "error: --frames 6: the causal encoder needs 1 + 4k frames (nearest valid: 5 or 9)"),
    (0, "error: --frames 0: the causal encoder needs 1 + 4k frames (nearest valid: 1 or 5)"),
])
def test_demo_refuses_frame_counts_the_encoder_cannot_take(tmp_path, capsys, frames, error):
    with pytest.raises(SystemExit) as e:
        demo.main(["--frames", str(frames), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == error
    assert not (tmp_path / "out").exists()


def test_demo_names_the_largest_count_a_short_clip_has(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--frames", "85", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --frames 85: clip_a.mp4 has only 81 frames; the largest valid count is 81\n")
    assert not (tmp_path / "out").exists()
