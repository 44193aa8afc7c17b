"""eval.py end to end on the bundled media with the tiny fixture models, and its errors.

The run is in-process and shared by the tests that read its outputs: 32 px crops and
5-frame clips keep it to one compile per network and input shape. The fixture models
have random weights, so the numbers are low; what is checked is that they are the
right numbers in the right places.
"""

import contextlib
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import jax
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from configs.eval import get_config
from cvvae_jax import CVVAE, assets, cli, data, evaluation, losses, metrics
from cvvae_jax.data import SampleSpec, load_sample
from cvvae_jax.eval_report import markdown_table

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CVVAE_DIR, SD_DIR = FIXTURES / "cvvae_v1_tiny", FIXTURES / "sd_vae_tiny"
SIZE, FRAMES, STRIDE = 32, 5, 3
ROWS = ("cvvae", "compat", "image_vae")


def _config(data, out_dir, **overrides):
    c = get_config()
    c.update(checkpoint=str(CVVAE_DIR), data=str(data), size=SIZE, frames=FRAMES,
             stride=STRIDE, out_dir=str(out_dir), read_threads=1)
    c.image_vae.path = str(SD_DIR)
    c.update(**overrides)
    return c


def _bundled_media(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in (*assets.CLIPS, *assets.IMAGES):
        shutil.copy(assets.path(name), d / name)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The bundled media plus a corrupt video, which skip_bad leaves out and counts; in
    batches of 2, so the last batch of each kind is padded."""
    tmp = tmp_path_factory.mktemp("eval")
    data = _bundled_media(tmp / "data")
    (data / "broken.mp4").write_bytes(b"not a video" * 100)
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger(evaluation.__name__).addHandler(handler)
    bar = io.StringIO()  # tqdm writes to the sys.stderr of when it starts
    try:
        with contextlib.redirect_stderr(bar):
            results = evaluation.evaluate(_config(data, tmp / "out", skip_bad=True, batch_size=2))
    finally:
        logging.getLogger(evaluation.__name__).removeHandler(handler)
    return (results, tmp / "out", [r for r in records if "LPIPS" in r.getMessage()],
            bar.getvalue())


def test_json_holds_every_clip_per_frame_and_the_aggregates(run):
    results, out, lpips_warnings, _ = run
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) == {"checkpoint", "image_vae", "protocol", "aggregate", "data", "clips",
                          "seconds", "table"}
    assert saved["protocol"] == {"size": SIZE, "frames": FRAMES, "stride": STRIDE,
                                 "mapping": "slice", "seed": 0, "short_clip": "pad",
                                 "dtype": "float32", "batch_size": 2, "max_clips": 0,
                                 "baseline": True, "lpips": False, "time_factor": 4}
    assert [c["name"] for c in saved["clips"]] == [*assets.CLIPS, *assets.IMAGES]
    assert saved["data"]["videos"]["unreadable"] == 1  # broken.mp4, skipped
    # Without a VGG16, LPIPS is null everywhere, after one warning.
    assert len(lpips_warnings) == 1
    for clip in saved["clips"]:
        t = FRAMES if clip["source"] == "videos" else 1
        lengths = {"cvvae": t, "compat": 1 + (t - 1) // 4, "image_vae": t}
        for row in ROWS:
            r = clip[row]
            assert len(r["frames"]["psnr"]) == len(r["frames"]["ssim"]) == lengths[row]
            assert r["lpips"] is None and r["frames"]["lpips"] is None
            assert all(math.isfinite(v) for v in r["frames"]["psnr"] + r["frames"]["ssim"])
            assert r["psnr"] == pytest.approx(np.mean(r["frames"]["psnr"]), abs=1e-5)
            # Random-weight models: noise-like outputs, but not garbage numbers.
            assert 5 < r["psnr"] < 20 and -0.2 < r["ssim"] < 0.3
    for source, n in (("videos", 2), ("images", 3)):
        agg = saved["aggregate"][source]
        assert agg["clips"] == n
        clips = [c for c in saved["clips"] if c["source"] == source]
        for row in ROWS:
            frames = [v for c in clips for v in c[row]["frames"]["psnr"]]
            assert agg[row]["psnr"] == pytest.approx(np.mean(frames), abs=1e-5)
    assert saved == json.loads(json.dumps({k: v for k, v in results.items() if k != "out_dir"}))


def test_progress_bar_counts_files_not_padding_and_ticks_for_skipped_ones(run):
    # 3 videos (broken.mp4 skipped) and 3 images, each kind padded to 4 by batches of 2.
    done, total = re.findall(r"(\d+)/(\d+)", run[3])[-1]
    assert (done, total) == ("6", "6"), run[3]
    assert "file/s" in run[3] or "s/file" in run[3], run[3]


def test_cvvae_numbers_are_those_of_an_independent_reconstruction(run):
    results, _, _, _ = run
    spec = SampleSpec(frames=FRAMES, size=(SIZE, SIZE), stride=(STRIDE, STRIDE), train=False)
    record = {"media": "video", "data": str(assets.path("clip_b.mp4")), "name": "clip_b.mp4",
              "caption": ""}
    x = load_sample(record, spec, None)["video"][None]
    recon = np.asarray(CVVAE.from_pretrained(CVVAE_DIR).reconstruct(x))
    a, b = (x[0] + 1) / 2, np.clip((recon[0] + 1) / 2, 0, 1)
    psnr = [peak_signal_noise_ratio(f, g, data_range=1) for f, g in zip(a, b)]
    ssim = [structural_similarity(f, g, data_range=1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=-1)
            for f, g in zip(a, b)]
    clip = next(c for c in results["clips"] if c["name"] == "clip_b.mp4")
    np.testing.assert_allclose(clip["cvvae"]["frames"]["psnr"], psnr, atol=1e-4)
    np.testing.assert_allclose(clip["cvvae"]["frames"]["ssim"], ssim, atol=1e-5)


def test_table_has_the_baseline_and_cvvae_rows_with_the_aggregates(run):
    results, _, _, _ = run
    lines = results["table"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "time compression", "video PSNR", "video SSIM", "video LPIPS",
                      "image PSNR", "image SSIM", "image LPIPS", "compat video PSNR",
                      "compat video SSIM", "compat image PSNR", "compat image SSIM"]
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")]
                                  for line in lines[2:])}
    assert list(rows) == ["image VAE (per frame)", "CV-VAE"]
    agg = results["aggregate"]
    assert rows["CV-VAE"] == [
        "4x", f"{agg['videos']['cvvae']['psnr']:.2f}", f"{agg['videos']['cvvae']['ssim']:.4f}",
        "n/a", f"{agg['images']['cvvae']['psnr']:.2f}", f"{agg['images']['cvvae']['ssim']:.4f}",
        "n/a", f"{agg['videos']['compat']['psnr']:.2f}", f"{agg['videos']['compat']['ssim']:.4f}",
        f"{agg['images']['compat']['psnr']:.2f}", f"{agg['images']['compat']['ssim']:.4f}"]
    baseline = rows["image VAE (per frame)"]
    assert baseline[:2] == ["1x", f"{agg['videos']['image_vae']['psnr']:.2f}"]
    assert baseline[-4:] == ["-"] * 4


def test_examples_show_input_and_three_outputs(run):
    _, out, _, _ = run
    names = sorted(p.name for p in (out / "examples").iterdir())
    assert names == ["images_000_image_0.png", "images_001_image_1.png",
                     "images_002_image_2.png", "videos_000_clip_a.mp4", "videos_000_clip_a.png",
                     "videos_001_clip_b.mp4", "videos_001_clip_b.png"]
    # Four rows of 32 px frames with 4 px gaps; videos show 4 frames, images 1.
    with Image.open(out / "examples" / "videos_000_clip_a.png") as png:
        assert png.height == 4 * SIZE + 3 * 4
    with Image.open(out / "examples" / "images_000_image_0.png") as png:
        assert png.height == 4 * SIZE + 3 * 4 and png.width < 2 * SIZE + 60


def test_table_shows_a_kind_without_clips_as_n_a():
    # Every video was skipped (short_clip="skip"); the image numbers still show.
    stats = {"psnr": 12.345, "ssim": 0.5, "lpips": None}
    results = {"protocol": {"time_factor": 4}, "aggregate": {
        "videos": {"clips": 0, "frames_per_clip": 9},
        "images": {"clips": 1, "frames_per_clip": 1, "cvvae": stats, "compat": stats,
                   "image_vae": stats}}}
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in markdown_table(results).splitlines()[2:]]
    assert rows == [
        ["image VAE (per frame)", "1x", "n/a", "n/a", "n/a", "12.35", "0.5000", "n/a",
         "-", "-", "-", "-"],
        ["CV-VAE", "4x", "n/a", "n/a", "n/a", "12.35", "0.5000", "n/a",
         "n/a", "n/a", "12.35", "0.5000"]]


def _clips(n=2, t=9):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n, t, 16, 16, 3)).astype(np.float32)
    view = rng.uniform(-1, 1, (n, 1 + (t - 1) // 4, 16, 16, 3)).astype(np.float32)
    return x, view


def test_first_mapping_scores_latent_frame_0_against_frame_0():
    # As the regulariser: the other latent frames (decoded for the examples) are not scored.
    x, view = _clips()
    out = evaluation.Scorer(None, mapping="first", time_factor=4)(x, x, view, None,
                                                                  jax.random.key(0))
    np.testing.assert_allclose(out["compat"]["psnr"],
                               np.asarray(metrics.psnr(x[:, :1], view[:, :1])), rtol=1e-6)
    assert out["compat"]["psnr"].shape == (2, 1)


def test_random_mapping_draws_per_clip_whatever_the_batching():
    x, view = _clips()
    scorer, key = evaluation.Scorer(None, mapping="random", time_factor=4), jax.random.key(3)
    batched = scorer(x, x, view, None, key, 5)["compat"]["psnr"]
    for i in range(2):
        alone = scorer(x[i:i + 1], x[i:i + 1], view[i:i + 1], None, key, 5 + i)["compat"]["psnr"]
        picks = losses.mapped_indices(9, "random", jax.random.fold_in(key, 5 + i))
        want = metrics.psnr(x[i][np.asarray(picks)], view[i])
        np.testing.assert_allclose(batched[i], want, rtol=1e-6)
        np.testing.assert_allclose(alone[0], want, rtol=1e-6)


def test_first_mapping_runs_end_to_end_and_examples_0_prints_no_examples_folder(tmp_path, capsys):
    (data := tmp_path / "clips").mkdir()
    shutil.copy(assets.path("clip_a.mp4"), data)
    out = tmp_path / "out"
    assert evaluation.main(_config(data, out, mapping="first", examples=0, baseline=False)) == 0
    clip, = json.loads((out / "eval.json").read_text())["clips"]
    assert len(clip["compat"]["frames"]["psnr"]) == 1 and len(clip["cvvae"]["frames"]["psnr"]) == FRAMES
    assert capsys.readouterr().out.endswith(f"\nper-clip results: {out}/eval.json\n")
    assert not (out / "examples").exists()


def test_tiny_config_without_its_models_says_how_to_train_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(evaluation.EvalError, match=r"^config.checkpoint='runs/cvvae_tiny' does "
                       r"not exist; README command 1 trains it \(or point config.checkpoint at"):
        evaluation.check_config(get_config("tiny"))


# -- bad input: one `error:` line, exit status 2 -------------------------------------------


def _corrupt_video_folder(d: Path) -> Path:
    """A good video, then a corrupt one: the run fails after writing an example."""
    d.mkdir()
    shutil.copy(assets.path("clip_a.mp4"), d / "a_good.mp4")
    (d / "b_broken.mp4").write_bytes(b"not a video" * 100)
    return d


def _bad_weights_dir(d: Path) -> Path:
    d.mkdir()
    shutil.copy(CVVAE_DIR / "config.json", d)
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    return d


def _zero_frame_folder(d: Path) -> Path:
    """A valid mp4 container whose video stream never got a frame."""
    d.mkdir()
    container = av.open(str(d / "no_frames.mp4"), mode="w")
    stream = container.add_stream("libx264", rate=8)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    container.start_encoding()  # writes the header, which muxing no packet never does
    container.mux(stream.encode(None))
    container.close()
    return d


@pytest.mark.parametrize("case, expected", [
    ("missing data", "config.data="),
    ("data is a file", "is a file"),
    ("no media", "holds no videos"),
    ("corrupt video", "b_broken.mp4: unreadable"),
    ("zero frames", "none of the 1 record(s) is readable"),
    ("every clip skipped", "gave no usable clip (videos: 1 short_clip_skipped)"),
    ("missing weights", "config.checkpoint="),
    ("unreadable weights", "diffusion_pytorch_model.safetensors"),
    ("frames not 1 + 4k", "config.frames=6"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, expected):
    data, overrides = _bundled_media(tmp_path / "media"), {}
    if case == "missing data":
        data = tmp_path / "nowhere"
    elif case == "data is a file":
        data = data / assets.CLIPS[0]
    elif case == "no media":
        (data := tmp_path / "text").mkdir()
        (data / "notes.txt").write_text("hello")
    elif case == "corrupt video":
        data = _corrupt_video_folder(tmp_path / "corrupt")
    elif case == "zero frames":
        data = _zero_frame_folder(tmp_path / "zero")
    elif case == "every clip skipped":  # 81 frames < 1 + 32 x 3
        (data := tmp_path / "short").mkdir()
        shutil.copy(assets.path("clip_a.mp4"), data)
        overrides.update(frames=33, short_clip="skip")
    elif case == "missing weights":
        overrides["checkpoint"] = str(tmp_path / "no_model")
    elif case == "unreadable weights":
        overrides["checkpoint"] = str(_bad_weights_dir(tmp_path / "bad_model"))
    elif case == "frames not 1 + 4k":
        overrides["frames"] = 6
    config = _config(data, tmp_path / "out", **overrides)
    rc = cli.run(lambda: evaluation.main(config))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and expected in errors[0], captured.err
    assert "Traceback" not in captured.err and "eval.json" not in captured.out
    assert not (tmp_path / "out").exists()  # neither eval.json nor a partial examples/


def test_eval_py_reports_a_bad_path_in_one_line():
    proc = subprocess.run(
        [sys.executable, "eval.py", "--config=configs/eval.py",
         f"--config.checkpoint={CVVAE_DIR}", f"--config.image_vae.path={SD_DIR}",
         "--config.data=/nonexistent/videos"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: config.data='/nonexistent/videos' does not exist\n"


def test_eval_py_reports_a_misspelt_override_in_one_line():
    # Without --config, ml_collections loads the default file and applies the overrides
    # while the flag is defined, before absl parses anything.
    proc = subprocess.run([sys.executable, "eval.py", "--config.framez=33"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --config.framez: the config has no field 'framez'; did you mean 'frames'?\n"


def test_without_skip_bad_only_unusable_files_leave_the_data_log(caplog):
    # The error that stops the pass names an unusable file; a repaired or upscaled one is
    # still used, so only the data log can tell of it.
    log = data.bad_data.BadDataLog(["src"])
    counts = np.zeros((1, len(data.REASONS)), np.int32)
    with caplog.at_level(logging.WARNING, logger="cvvae_jax.data.bad_data"):
        with evaluation._quiet_bad_data(True):
            log.add("src", counts, np.array(["unreadable\tbroken.mp4\nupscaled\tsmall.mp4"]))
        log.add("src", counts, np.array(["decode_error\tcut.mp4"]))
    assert [r.getMessage() for r in caplog.records] == [
        "data source 'src': upscaled: small.mp4 (logged once, counted each time)",
        "data source 'src': decode_error: cut.mp4 (logged once, counted each time)"]
