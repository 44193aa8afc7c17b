"""encode_dataset: latents equal to CVVAE.encode, exact resume, disjoint process shards, CLI."""

import json
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cvvae_jax import CVVAE, encode_dataset as ed, latent_shards
from cvvae_jax.data import load_sample, parse_source, testing
from cvvae_jax.data.transforms import SampleSpec
from conftest import FIXTURES

SCALE = 0.18215  # the fixture's config.json
WEIGHTS = FIXTURES / "cvvae_v1_tiny"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Six indexed 32x40 videos of 9-14 frames, an empty one (sorted last), three images."""
    root = tmp_path_factory.mktemp("media")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    for i in range(6):
        testing.write_indexed_video(root / "videos" / f"clip_{i}.mp4", 9 + i, size=(32, 40))
    (root / "videos" / "clip_6_empty.mp4").write_bytes(b"")
    for i in range(3):
        Image.fromarray(testing.indexed_frame(3 * i, (40, 48))).save(root / "images" / f"i{i}.png")
    return root


@pytest.fixture(scope="module")
def vae():
    return CVVAE.from_pretrained(WEIGHTS)


class Interrupted(Exception):
    pass


class CountingVAE:
    """The VAE with its encode calls counted; the call numbered `fail_at` raises instead."""

    def __init__(self, vae, fail_at=None):
        self._vae, self._fail_at, self.calls = vae, fail_at, 0

    def __getattr__(self, name):
        return getattr(self._vae, name)

    def encode(self, x):
        self.calls += 1
        if self.calls == self._fail_at:
            raise Interrupted
        return self._vae.encode(x)


def video_source(media):
    # frames 0, 2, 4, 6, 8 of every clip; a shard of 3 records is a batch of 2 and one of 1
    return parse_source({"name": "v", "kind": "video_folder", "path": str(media / "videos"),
                         "frames": 5, "size": (32, 32), "stride": 2, "batch_size": 2})


def read_all(out) -> list[dict]:
    """Every stored record, read back through Grain."""
    source = grain.sources.ArrayRecordDataSource([str(p) for p in latent_shards.shard_paths(out)])
    return [latent_shards.read_record(source[i]) for i in range(len(source))]


def expected_latents(vae, source_config, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CVVAE.encode on the same pixels, scaled; in padded pairs, the shape it compiled for."""
    spec = SampleSpec(frames=source_config.frames, size=source_config.size,
                      stride=source_config.stride, train=False)
    root = source_config.path
    videos = [load_sample({"media": source_config.media, "data": f"{root}/{n}", "name": n,
                           "caption": ""}, spec, None)["video"] for n in names]
    if source_config.media == "video":  # the stored frame indices are the frames encoded
        for v in videos:
            np.testing.assert_array_equal(testing.frame_ids(v), [0, 2, 4, 6, 8])
    videos += [np.zeros_like(videos[0])] * (len(videos) % 2)
    out = {}
    for i in range(0, len(videos), 2):
        post = vae.encode(np.stack(videos[i:i + 2]))
        for n, stats in zip(names[i:i + 2], zip(np.asarray(post.mean), np.asarray(post.std))):
            out[n] = (stats[0] * SCALE, stats[1] * SCALE)
    return out


def test_interrupted_run_resumes_with_no_duplicates_or_gaps(media, vae, tmp_path):
    out, source = tmp_path / "latents", video_source(media)
    # Calls: shard 0 = records 0-2 (2 batches), shard 1 = 3-5 (2), shard 2 = the empty file (0).
    with pytest.raises(Interrupted):
        ed.encode_dataset(CountingVAE(vae, fail_at=4), source, out, shard_size=3, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["latents-00000-of-00003.array_record", "latents-00000-of-00003.json",
                     "latents-00001-of-00003.array_record.tmp", "metadata.json"]
    assert len(grain.sources.ArrayRecordDataSource(
        [str(out / "latents-00001-of-00003.array_record.tmp")])) == 2  # the partial shard
    assert not json.loads((out / "metadata.json").read_text())["complete"]
    first = (out / "latents-00000-of-00003.array_record").stat().st_mtime_ns

    resumed = CountingVAE(vae)
    result = ed.encode_dataset(resumed, source, out, shard_size=3, progress=False)
    assert resumed.calls == 2  # shard 1 again, whole; shard 0 kept
    assert (out / "latents-00000-of-00003.array_record").stat().st_mtime_ns == first
    assert not list(out.glob("*.tmp*"))
    assert {k: result[k] for k in ("shards", "shards_written", "encoded", "skipped")} == \
        {"shards": 3, "shards_written": 2, "encoded": 3, "skipped": 1}

    records = read_all(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["name"] for r in records] == [f"clip_{i}.mp4" for i in range(6)]
    want = expected_latents(vae, source, [r["name"] for r in records])
    for r in records:
        assert r["latent"].shape == (2, 4, 4, 4) and r["latent"].dtype == np.float32
        np.testing.assert_allclose(r["latent"], want[r["name"]][0], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(r["frame_indices"], [0, 2, 4, 6, 8])
        assert r["caption"] == "" and "latent_std" not in r
    assert 0.05 < np.std([r["latent"] for r in records]) < 5  # real latents, not zeros

    metadata = result["metadata"]
    assert metadata == json.loads((out / "metadata.json").read_text())
    assert metadata["complete"] and metadata["counts"] == {
        "encoded": 6, "skipped": 1, "bad_data": {"empty_file": 1}}
    assert (metadata["scaling_factor"], metadata["latent_shape"], metadata["video_shape"]) == \
        (SCALE, [2, 4, 4, 4], [5, 32, 32, 3])
    assert metadata["model"]["config"]["_class_name"] == "CVVAEModel"
    assert json.loads((out / "latents-00002-of-00003.json").read_text())["skipped"] == [
        {"index": 6, "name": "clip_6_empty.mp4", "reason": "empty_file"}]

    # The same folder at another stride would mix two datasets: refused.
    other = parse_source({**{k: getattr(source, k) for k in ("name", "kind", "path", "frames",
                                                               "size", "batch_size")},
                          "stride": 1})
    with pytest.raises(ValueError, match=r"differing: stride: 2 -> 1\)"):
        ed.encode_dataset(vae, other, out, shard_size=3, progress=False)


def test_two_processes_write_disjoint_shards_covering_everything(media, vae, tmp_path):
    out, source = tmp_path / "latents", video_source(media)
    first = ed.encode_dataset(vae, source, out, shard_size=2, process_index=0, process_count=2,
                              progress=False)
    # Shards 0 and 2 (records 0-1, 4-5); the totals wait for process 1.
    assert (first["shards"], first["encoded"], "metadata" in first) == (2, 4, False)
    written_by_0 = {p.name for p in latent_shards.shard_paths(out)}
    assert written_by_0 == {"latents-00000-of-00004.array_record",
                            "latents-00002-of-00004.array_record"}
    second = ed.encode_dataset(vae, source, out, shard_size=2, process_index=1, process_count=2,
                               progress=False)
    assert (second["shards"], second["encoded"], second["skipped"]) == (2, 2, 1)
    assert {p.name for p in latent_shards.shard_paths(out)} - written_by_0 == {
        "latents-00001-of-00004.array_record", "latents-00003-of-00004.array_record"}

    records = read_all(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 5]
    want = expected_latents(vae, source, [r["name"] for r in records])
    for r in records:
        np.testing.assert_allclose(r["latent"], want[r["name"]][0], rtol=0, atol=1e-5)
    assert second["metadata"]["counts"]["encoded"] == 6


def test_cli_encodes_images_with_std_and_fails_in_one_line(media, vae, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.run replaces it
    loaded = []

    def from_pretrained(path, **kwargs):
        # The module's VAE: loading again and compiling its encoder again would double the time.
        loaded.append((path, kwargs))
        return vae

    monkeypatch.setattr(ed.CVVAE, "from_pretrained", from_pretrained)
    out = tmp_path / "latents"
    args = ["--weights", str(WEIGHTS), "--data", str(media / "images"), "--out", str(out),
            "--frames", "1", "--size", "32", "32", "--batch-size", "2", "--store-std",
            "--latent-dtype", "bfloat16", "--process-index", "0", "--process-count", "1"]
    assert ed.main(args) == 0
    assert loaded == [(WEIGHTS, {"dtype": jnp.float32})]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (f"{out}: complete, 3 records of latents (1, 4, 4, 4) bfloat16 in "
                         "1 shard(s), 0 skipped")

    records = read_all(out)
    assert [(r["index"], r["name"]) for r in records] == [(0, "i0.png"), (1, "i1.png"),
                                                          (2, "i2.png")]
    images = parse_source({"name": "i", "kind": "image_folder", "path": str(media / "images"),
                           "frames": 1, "size": (32, 32), "batch_size": 2})
    want = expected_latents(vae, images, [r["name"] for r in records])
    for r in records:
        assert r["latent"].dtype == r["latent_std"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(r["frame_indices"], [0])
        for got, ref in zip((r["latent"], r["latent_std"]), want[r["name"]]):
            np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2**-8, atol=1e-6)

    (tmp_path / "a_file").write_text("")
    for bad, reason in ((["--data", str(tmp_path / "none")], "no such folder"),
                        (["--weights", str(tmp_path / "none")], "no such directory"),
                        (["--out", str(tmp_path / "a_file")], "is a file; give the folder"),
                        (["--batch-size", "0"], "--batch-size 0: must be >= 1")):
        patched = list(args)
        patched[patched.index(bad[0]) + 1] = bad[1]
        assert ed.main(patched) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and reason in captured.err
        assert len(captured.err.strip().splitlines()) == 1


def test_cli_names_skipped_files_and_tells_repairs_from_skips(media, vae, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.run replaces it
    monkeypatch.setattr(ed.CVVAE, "from_pretrained", lambda path, **kwargs: vae)
    out = tmp_path / "latents"
    # 48 x 48 crops of 32 x 40 frames: every clip is enlarged first; the empty file is skipped.
    args = ["--weights", str(WEIGHTS), "--data", str(media / "videos"), "--out", str(out),
            "--frames", "5", "--stride", "2", "--size", "48", "48", "--batch-size", "2"]
    assert ed.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "skipped: clip_6_empty.mp4 (empty_file) (every one in its shard's .json)"
    assert lines[-1] == (f"{out}: complete, 6 records of latents (2, 6, 6, 4) float32 in 1 shard(s), "
                         "1 skipped (empty_file 1); used after upscaled 6")


def test_changed_captions_are_another_dataset(media, vae, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\nclip_0.mp4,first\n")
    source = parse_source({"name": "v", "kind": "video_folder", "path": str(media / "videos"),
                           "frames": 5, "size": (32, 32), "stride": 2, "batch_size": 2,
                           "metadata": str(captions)})
    out = tmp_path / "latents"
    ed.encode_dataset(vae, source, out, shard_size=2, process_index=0, process_count=2,
                      progress=False)
    captions.write_text("file,caption\nclip_0.mp4,second\n")
    again = parse_source({**{k: getattr(source, k) for k in ("name", "kind", "path", "frames",
                                                               "size", "stride", "batch_size")},
                          "metadata": str(captions)})
    with pytest.raises(ValueError, match=r"differing: source.metadata_sha256: '[0-9a-f]{36}\.\.\. -> "):
        ed.encode_dataset(vae, again, out, shard_size=2, progress=False)
