"""Train and eval pipelines: mixing schedule, per-process shards, exact resume, workers."""

import json

import grain
import numpy as np
import pytest
from PIL import Image

from cvvae_jax.data import config, make_eval_pipeline, make_train_pipeline, testing


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three small indexed videos and five distinct images."""
    root = tmp_path_factory.mktemp("media")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    for i, n in enumerate((12, 16, 20)):
        testing.write_indexed_video(root / "videos" / f"v{i}.mp4", n, size=(24, 32))
    for i in range(5):
        Image.fromarray(testing.indexed_frame(i, (20, 28))).save(root / "images" / f"i{i}.png")
    return root


def _config(media, *, video_weight=0.5, num_workers=0):
    c = config.default_config()
    c.sources = [
        {"name": "videos", "kind": "video_folder", "path": str(media / "videos"),
         "weight": video_weight, "frames": 5, "size": (16, 16), "stride": (1, 2), "batch_size": 1},
        {"name": "images", "kind": "image_folder", "path": str(media / "images"),
         "weight": 1 - video_weight, "frames": 1, "size": (16, 24), "batch_size": 2},
    ]
    c.eval_sources = [{"name": "images", "kind": "image_folder", "path": str(media / "images"),
                       "frames": 1, "size": (16, 16), "batch_size": 2}]
    c.num_workers = num_workers
    return c


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _assert_same_batches(a, b):
    assert [name for name, _ in a] == [name for name, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_steps_follow_the_schedule_with_each_source_shape(media):
    pipeline = make_train_pipeline(_config(media, video_weight=0.25), process_index=0,
                                   process_count=1, per_process_batch_scale=2)
    # Ties go to the source listed first: videos.
    assert pipeline.schedule.cycle == ("images", "videos", "images", "images")
    assert pipeline.batch_shapes == {"videos": (2, 5, 16, 16, 3), "images": (4, 1, 16, 24, 3)}
    for step, (name, batch) in enumerate(_take(pipeline, 8)):
        assert name == pipeline.schedule(step)
        assert batch["video"].shape == pipeline.batch_shapes[name]
        assert batch["video"].dtype == np.float32
        assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
        assert set(batch) == {"video", "name", "caption"}
    assert pipeline.step == 8


def test_process_shards_are_disjoint_and_cover_the_data(media):
    c = _config(media)
    c.sources = [dict(c.sources[1], batch_size=1)]
    seen = []
    for index, expected_len in ((0, 3), (1, 2)):
        pipeline = make_train_pipeline(c, process_index=index, process_count=2)
        # One epoch of this shard, then the next epoch starts over the same files.
        epoch = [str(b["name"][0]) for _, b in _take(pipeline, expected_len)]
        assert len(set(epoch)) == expected_len
        assert {str(b["name"][0]) for _, b in _take(pipeline, expected_len)} == set(epoch)
        seen.append(set(epoch))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"i{i}.png" for i in range(5)}


def test_eval_shards_are_disjoint_cover_and_give_every_process_the_same_batches(media):
    c = _config(media)
    names, masks = [], []
    for index in range(2):
        pipeline = make_eval_pipeline(c, process_index=index, process_count=2)
        batches = [b for _, b in pipeline]
        assert len(batches) == pipeline.num_batches["images"] == 2  # 3 records -> 2 x 2
        mask = np.concatenate([b["mask"] for b in batches])
        got = np.concatenate([b["name"] for b in batches])[mask]
        names.append(set(got))
        masks.append(mask.tolist())
        # Deterministic: a second pass is identical.
        _assert_same_batches([("images", b) for b in batches], list(pipeline))
    assert masks == [[True, True, True, False], [True, True, False, False]]
    assert not names[0] & names[1] and names[0] | names[1] == {f"i{i}.png" for i in range(5)}


def test_resume_gives_exactly_the_batches_that_would_have_come(media):
    c = _config(media)
    pipeline = make_train_pipeline(c, process_index=0, process_count=1)
    _take(pipeline, 5)
    state = json.loads(json.dumps(pipeline.get_state()))  # JSON-serialisable
    expected = _take(pipeline, 6)

    fresh = make_train_pipeline(c, process_index=0, process_count=1)
    fresh.set_state(state)
    assert fresh.step == 5
    _assert_same_batches(_take(fresh, 6), expected)
    # Different seeds give different streams (the comparison above is not vacuous).
    other = make_train_pipeline(c, process_index=0, process_count=1, seed=1)
    other.set_state(state)
    assert any(not np.array_equal(a[1]["video"], b[1]["video"])
               for a, b in zip(_take(other, 6), expected))


def test_state_goes_through_an_orbax_checkpoint(media, tmp_path):
    import orbax.checkpoint as ocp

    c = _config(media)
    pipeline = make_train_pipeline(c, process_index=0, process_count=1)
    _take(pipeline, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(pipeline)))
        manager.wait_until_finished()
    expected = _take(pipeline, 4)
    fresh = make_train_pipeline(c, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same_batches(_take(fresh, 4), expected)


def test_set_state_rejects_another_pipelines_state(media):
    c = _config(media)
    state = make_train_pipeline(c, process_index=0, process_count=1).get_state()
    c.sources = [c.sources[0]]
    with pytest.raises(ValueError, match="sources"):
        make_train_pipeline(c, process_index=0, process_count=1).set_state(state)


def test_one_worker_process_gives_the_same_stream_and_resumes(media):
    c = _config(media)
    c.sources = [c.sources[0]]  # each source has its own workers: one source starts fewer
    expected = _take(make_train_pipeline(c, process_index=0, process_count=1), 6)
    c.num_workers = 1
    pipeline = make_train_pipeline(c, process_index=0, process_count=1)
    try:
        _assert_same_batches(_take(pipeline, 3), expected[:3])
        state = pipeline.get_state()
    finally:
        pipeline.close()
    fresh = make_train_pipeline(c, process_index=0, process_count=1)
    try:
        fresh.set_state(state)
        _assert_same_batches(_take(fresh, 3), expected[3:])
    finally:
        fresh.close()
