"""The reconstruction CLI (cvvae_jax.reconstruct) on a bundled clip with the tiny fixture.

Every run that reaches the model encodes 9 frames of 40x64 in chunks of 4 + 1 frames, so
the whole file compiles one encoder and one decoder shape.
"""

import contextlib
import io
import shutil

import av
import numpy as np
import pytest
from PIL import Image

import cvvae_jax
from cvvae_jax import assets, media, metrics, reconstruct, tiling
from conftest import FIXTURES

CLIP = assets.path("clip_a.mp4")  # 81 frames of 144x256 at 30 fps
WEIGHTS = FIXTURES / "cvvae_v1_tiny"
# 7 frames (odd, not 1 + 4k) pad to 9; --size 42x70 is not a multiple of 8 and crops to 40x64.
COMMON = ["--weights", str(WEIGHTS), "--size", "42x70", "--chunk-frames", "4"]


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = reconstruct.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full run, then encode-only and decode-only runs of the same clip."""
    d = tmp_path_factory.mktemp("reconstruct")
    full = run(CLIP, *COMMON, "--max-frames", 7, "--out", d / "full.mp4",
               "--latents", d / "full.safetensors")
    enc = run(CLIP, *COMMON, "--max-frames", 7, "--encode-only", "--latents", d / "enc.safetensors")
    # No --chunk-frames: the latents file says how they were encoded.
    dec = run(d / "enc.safetensors", "--decode-only", "--weights", FIXTURES,
              "--subfolder", WEIGHTS.name, "--out", d / "dec.mp4")
    for rc, _, err in (full, enc, dec):
        assert rc == 0, err
    return d, full[1], enc[1], dec[1]


def test_odd_clip_is_padded_and_cropped_and_says_so(runs):
    d, out, _, _ = runs
    assert "frames:  7 -> 9 (padded 2 by repeating the last frame; the encoder needs 1 + 4k); " \
           "the output is trimmed back to 7" in out
    assert "size:    144x256 -> 40x64 (H x W; --size 42x70 rounded down to multiples of 8; " \
           "scaled to cover it, then centre-cropped)" in out
    assert "model:   CVVAEModel, float32, chunks of 4 frames, tiling off" in out
    assert "latents: (1, 3, 5, 8, 4) (B, T, H/8, W/8, C)" in out
    frames, fps = media.read_video(d / "full.mp4")
    assert frames.shape == (7, 40, 64, 3)
    assert fps == 30.0


def test_printed_psnr_is_that_of_the_decoded_latents(runs):
    d, out, _, _ = runs
    frames, _ = media.read_video(CLIP, max_frames=7)
    frames, _ = reconstruct.fit_size(frames, (42, 70), "crop")
    z, _ = reconstruct.load_latents(d / "full.safetensors")
    vae = cvvae_jax.CVVAE.from_pretrained(WEIGHTS)
    # The official decode chunking of --chunk-frames 4: one latent frame (+ 1 of context).
    recon = tiling.chunked(vae.decode, z, 1)[0, :7]
    psnr = np.asarray(metrics.psnr(media.to_float(frames), recon)).mean()
    assert f"PSNR:    {psnr:.2f} dB (mean over 7 frames)" in out
    assert 5 < psnr < 30  # the tiny random model reconstructs poorly but not as noise


def test_encode_only_then_decode_only_equals_the_full_run(runs):
    d, full_out, enc_out, dec_out = runs
    z_full, meta_full = reconstruct.load_latents(d / "full.safetensors")
    z_enc, meta_enc = reconstruct.load_latents(d / "enc.safetensors")
    assert z_full.shape == (1, 3, 5, 8, 4) and z_full.dtype == np.float32
    np.testing.assert_array_equal(z_enc, z_full)
    assert meta_enc == meta_full
    assert {k: meta_full[k] for k in ("scaling_factor", "fps", "source_frames", "encoded_frames",
                                      "output_frames", "frames_mode", "size", "model")} == {
        "scaling_factor": "0.18215", "fps": "30.0", "source_frames": "7",
        "encoded_frames": "9", "output_frames": "7", "frames_mode": "pad", "size": "40x64",
        "model": "CVVAEModel"}
    assert {k: meta_full[k] for k in ("en_de_n_frames_a_time", "tile_spatial_size")} == {
        "en_de_n_frames_a_time": "4", "tile_spatial_size": "none"}
    assert "model:   CVVAEModel, float32, chunks of 4 frames, tiling off" in dec_out
    assert "PSNR" not in enc_out and not (d / "enc_recon.mp4").exists()
    assert "PSNR" not in dec_out
    full, fps_full = media.read_video(d / "full.mp4")
    dec, fps_dec = media.read_video(d / "dec.mp4")
    np.testing.assert_array_equal(dec, full)
    assert fps_dec == fps_full == 30.0


def test_decode_only_computes_in_the_dtype_that_encoded(tmp_path):
    rc, _, err = run(CLIP, *COMMON, "--max-frames", 7, "--encode-only", "--dtype", "bf16",
                     "--latents", tmp_path / "bf16.safetensors")
    assert rc == 0, err
    argv = [tmp_path / "bf16.safetensors", "--decode-only", "--weights", WEIGHTS, "--chunk-frames", 4]
    rc, out, err = run(*argv, "--out", tmp_path / "a.mp4")
    assert rc == 0, err
    assert "model:   CVVAEModel, bfloat16," in out
    rc, out, err = run(*argv, "--out", tmp_path / "b.mp4", "--dtype", "fp32")
    assert rc == 0, err
    assert "note:    the latents were encoded in bfloat16; decoding in float32" in out


def test_trim_and_side_by_side(tmp_path):
    rc, out, err = run(CLIP, *COMMON, "--max-frames", 10, "--frames", "trim", "--side-by-side",
                       "--out", tmp_path / "sbs.mp4")
    assert rc == 0, err
    assert "frames:  10 -> 9 (trimmed 1 from the end; the encoder needs 1 + 4k)" in out
    assert "wrote:   " in out and "(input | reconstruction, 9 frames, 30 fps)" in out
    video, _ = media.read_video(tmp_path / "sbs.mp4")
    assert video.shape == (9, 40, 64 + 4 + 64, 3)  # 4 px white separator
    source, _ = media.read_video(CLIP, max_frames=9)
    source, _ = reconstruct.fit_size(source, (42, 70), "crop")
    left = np.abs(video[..., :64, :].astype(float) - source).mean()
    right = np.abs(video[..., -64:, :].astype(float) - source).mean()
    assert left < 8  # 5.2: H.264 at CRF 23 on 40x64 frames
    assert right > 40  # 64: the random model's reconstruction


def test_fit_size_geometry():
    frames = np.arange(2 * 20 * 30 * 3, dtype=np.uint8).reshape(2, 20, 30, 3)
    cropped, note = reconstruct.fit_size(frames, None, "crop")
    np.testing.assert_array_equal(cropped, frames[:, 2:18, 3:27])  # centred 16x24
    assert note == ("20x30 -> 16x24 (H x W; centre-cropped to multiples of 8; "
                    "--fit resize resizes instead)")
    resized, note = reconstruct.fit_size(frames, None, "resize")
    assert resized.shape == (2, 24, 32, 3)  # 20 -> 24: halves round up
    assert note == "20x30 -> 24x32 (H x W; resized to the nearest multiples of 8, aspect not kept)"
    # Covering 40x40 from 20x30 scales by 2 to 40x60, then crops the centre 40 columns.
    assert reconstruct.fit_size(frames, (43, 41), "crop")[0].shape == (2, 40, 40, 3)
    same, note = reconstruct.fit_size(frames[:, :16, :24], None, "crop")
    assert same.shape == (2, 16, 24, 3) and note == "16x24 (H x W, already multiples of 8)"


def test_fit_frames_pads_with_the_last_frame_and_trims_from_the_end():
    frames = np.arange(6)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    padded, _ = reconstruct.fit_frames(frames, "pad")
    assert padded[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5]
    trimmed, _ = reconstruct.fit_frames(frames, "trim")
    assert trimmed[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert reconstruct.fit_frames(frames[:5], "pad")[1] == "5 (already 1 + 4k)"


def _corrupt_video(d):
    (d / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return [d / "x.mp4"]


def _zero_frame_video(d):
    """An mp4 whose header declares 3 frames but whose frame data is cut off."""
    path = d / "z.mp4"
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), "rgb24")))
        c.mux(s.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"mdat") + 4])  # faststart puts the index first
    return [path]


def _corrupt_weights(d):
    shutil.copy(WEIGHTS / "config.json", d)
    (d / "diffusion_pytorch_model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return [CLIP, "--max-frames", 1, "--weights", d]


BAD = {
    "missing video": (lambda d: [d / "nope.mp4"], "video file not found: "),
    "corrupt video": (_corrupt_video, "cannot decode"),
    "zero frames": (_zero_frame_video, "no frames read from"),
    "corrupt weights": (_corrupt_weights, "corrupt or truncated safetensors"),
    "no weights dir": (lambda d: [CLIP, "--weights", d / "none"], "no such directory"),
    "bad size": (lambda d: [CLIP, "--size", "60by90"], "--size '60by90': expected HxW"),
    "tiny size": (lambda d: [CLIP, "--size", "4x4"], "cropping leaves less than 8 px"),
    "output over input": (lambda d: [CLIP, "--out", CLIP], "is the input file"),
    "output over latents": (lambda d: [CLIP, "--out", d / "x.mp4", "--latents", d / "x.mp4"],
                            "latents are written as safetensors; end the name with .safetensors"),
    "video for --decode-only": (lambda d: [CLIP, "--decode-only"], "--decode-only takes a latents file"),
    "latents without --decode-only": (lambda d: [d / "z.safetensors"], "add --decode-only"),
    "flags --decode-only ignores": (lambda d: [d / "z.safetensors", "--decode-only", "--size", "8x8",
                                               "--frames", "trim"],
                                    "--decode-only has no input video: drop --size, --frames"),
    "tile off the grid": (lambda d: [CLIP, "--tile", "30", "--out", d / "never.mp4"],
                          "--tile 30: must be a multiple of 8, the model's spatial factor"),
    "input is a folder": (lambda d: [d], "is a directory; give a video file"),
    "gif output": (lambda d: [CLIP, "--out", d / "x.gif"], "videos are written as H.264"),
    "output is a folder": (lambda d: [CLIP, "--out", d], "is a directory; give a video file name"),
    "latents is a folder": (lambda d: [CLIP, "--encode-only", "--latents", d],
                            "is a directory; give a file name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line(case, tmp_path):
    make, message = BAD[case]
    argv = make(tmp_path)
    if "--weights" not in argv:
        argv += ["--weights", WEIGHTS]
    rc, out, err = run(*argv)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def _numbered(n):
    """Frames 0..n-1 of 1x1 pixels holding their index, and how many were pulled."""
    pulled = []

    def frames():
        for i in range(n):
            pulled.append(i)
            yield np.full((1, 1, 3), i, np.uint8)

    return frames(), pulled


@pytest.mark.parametrize("n,mode,per_chunk,want", [
    # 1 + 4 + 4 frames in chunks of 4 + 1, the first frame of each shared with the last.
    (9, "pad", 4, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]),
    (10, "pad", 4, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 9, 9, 9]]),
    (7, "pad", 4, [[0, 1, 2, 3, 4], [4, 5, 6, 6, 6]]),
    (11, "trim", 4, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]),  # 11 -> 9: no frame left for a third
    (11, "trim", 8, [[0, 1, 2, 3, 4, 5, 6, 7, 8]]),
    (3, "trim", 4, [[0]]),
    (6, "pad", None, [[0, 1, 2, 3, 4, 5, 5, 5, 5]]),
])
def test_frame_chunks_are_the_official_chunks_of_the_fitted_video(n, mode, per_chunk, want):
    frames, _ = _numbered(n)
    chunks = reconstruct.FrameChunks(frames, per_chunk, mode, 4)
    got = [c[:, 0, 0, 0].tolist() for c in chunks]
    assert got == want
    fitted, note = reconstruct.fit_frames(np.arange(n), mode)
    assert (chunks.source_frames, chunks.encoded_frames, chunks.note) == (n, len(fitted), note)
    whole = np.concatenate([np.asarray(want[0])] + [np.asarray(c[1:]) for c in want[1:]])
    np.testing.assert_array_equal(whole, fitted)
    if per_chunk:
        assert [(a, b) for a, b in tiling.chunk_bounds(len(fitted), per_chunk)] == \
            [(i * per_chunk, i * per_chunk + len(c)) for i, c in enumerate(want)]


def test_frame_chunks_read_one_chunk_ahead_at_most():
    frames, pulled = _numbered(1000)
    chunks = iter(reconstruct.FrameChunks(frames, 16, "pad", 4))
    next(chunks)
    assert len(pulled) == 17
    next(chunks)
    assert len(pulled) == 33


def test_streamed_run_equals_the_whole_clip_through_the_python_api(tmp_path):
    # 11 frames in chunks of 4: three chunks, the last one padded (the module's one shape).
    rc, out, err = run(CLIP, *COMMON, "--max-frames", 11, "--out", tmp_path / "r.mp4",
                       "--latents", tmp_path / "r.safetensors")
    assert rc == 0, err
    assert "frames:  11 -> 13 (padded 2" in out
    frames, _ = media.read_video(CLIP, max_frames=11)
    frames, _ = reconstruct.fit_size(frames, (42, 70), "crop")
    frames, _ = reconstruct.fit_frames(frames, "pad")
    vae = reconstruct.load_vae(WEIGHTS, chunk_frames=4)
    z_whole = reconstruct.encode(vae, media.to_float(frames)[None], progress=False)
    z, _ = reconstruct.load_latents(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(z, np.asarray(z_whole))
    recon = np.asarray(reconstruct.decode(vae, z_whole, progress=False)[0, :11], np.float32)
    psnr = np.asarray(metrics.psnr(media.to_float(frames[:11]), recon)).mean()
    assert f"PSNR:    {psnr:.2f} dB (mean over 11 frames)" in out
    # Written chunk by chunk, the same frames make the same H.264 stream as written at once.
    media.write_video(tmp_path / "whole.mp4", recon, 30)
    written, _ = media.read_video(tmp_path / "r.mp4")
    assert written.shape == (11, 40, 64, 3)
    np.testing.assert_array_equal(written, media.read_video(tmp_path / "whole.mp4")[0])


def test_flags_are_checked_before_the_video_is_read(tmp_path):
    for flags, error in ((["--chunk-frames", "6"], "--chunk-frames 6: "),
                         (["--size", "4x4"], "cropping leaves less than 8 px")):
        rc, out, err = run(CLIP, "--weights", WEIGHTS, "--out", tmp_path / "x.mp4", *flags)
        assert (rc, out) == (2, "") and error in err, err


def test_a_failed_run_leaves_no_partial_video(tmp_path, monkeypatch):
    calls = []

    def failing_write(self, frames):
        calls.append(len(frames))
        raise OSError("disk full")

    monkeypatch.setattr(media.VideoOut, "write", failing_write)
    rc, _, err = run(CLIP, *COMMON, "--max-frames", 5, "--out", tmp_path / "x.mp4")
    assert rc == 2 and "disk full" in err and calls
    assert not (tmp_path / "x.mp4").exists()


def test_a_still_image_can_come_back_as_an_image(tmp_path):
    still = tmp_path / "still.png"
    Image.fromarray(media.read_video(CLIP, max_frames=1)[0][0]).save(still)
    rc, out, err = run(still, *COMMON, "--out", tmp_path / "recon.png", "--side-by-side")
    assert rc == 0, err
    assert "PSNR:" in out and "(one frame)" in out and "(input | reconstruction, an image)" in out
    assert Image.open(tmp_path / "recon.png").size == (64 + 4 + 64, 40)
    # A video cannot: refused before the model runs, with nothing written.
    rc, out, err = run(CLIP, *COMMON, "--out", tmp_path / "video.png")
    assert rc == 2 and "latents:" not in out and not (tmp_path / "video.png").exists()
    assert err == (f"error: --out {tmp_path / 'video.png'} is an image, and {CLIP} has 81 frames: "
                   "give a video name, or --max-frames 1\n")
