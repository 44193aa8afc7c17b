"""The trainer end to end, one subprocess per run: sharding, multi-process, resumes, SIGTERM.

Every run is `train.py` (or tests/train_worker.py, train.py with test hooks) on the
config in tests/train_config.py: a two-level CV-VAE with the decoder regulariser,
6 steps on a global batch of 8 clips of 5x8x8, checkpoints every 3 steps. The runs
share a persistent compilation cache and XLA flags that trade run time for compile
time, so each distinct step compiles once per session.

The reference run (one device, 6 steps, uninterrupted) is the yardstick: an 8-device
FSDP run matches it to 1e-5; runs interrupted by SIGKILL, by SIGTERM or by a damaged
checkpoint, then resumed, match it exactly.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest
from safetensors.numpy import load_file

from conftest import FAST_COMPILE, xla_flags

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/train_config.py"
WORKER = "tests/train_worker.py"
TIMEOUT_S = 300  # per run; one takes 10-60 s on 2 busy cores
SHARDED = ["--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.fsdp_min_size=4096",
           "--config.data.sources[0].batch_size=1"]  # 8 devices x 1 clip = the reference's 8
KERNEL = "['decoder']['mid']['block_1']['conv1']['kernel'].value"  # (3, 3, 3, 32, 32)
BIAS = "['decoder']['mid']['block_1']['conv1']['bias'].value"  # (32,)


# -- launching runs ------------------------------------------------------------------------


class Run:
    """A trainer subprocess; its output goes to files next to its workdir."""

    def __init__(self, name: str, workdir: Path, env: dict, *args: str, worker: bool = False,
                 devices: int = 1, extra_env: dict | None = None, timeout: float = TIMEOUT_S):
        self.name, self.workdir = name, workdir
        env = dict(env, **(extra_env or {}))
        env["XLA_FLAGS"] = (f"{xla_flags(FAST_COMPILE)} "
                            f"--xla_force_host_platform_device_count={devices}")
        self._out = open(workdir.parent / f"{name}.out", "w+")  # noqa: SIM115
        self._err = open(workdir.parent / f"{name}.err", "w+")  # noqa: SIM115
        cmd = [sys.executable, WORKER if worker else "train.py", f"--config={CONFIG}",
               f"--workdir={workdir}", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err)
        self.deadline = time.monotonic() + timeout
        self.returncode = self.stdout = self.stderr = None

    def wait(self) -> "Run":
        if self.returncode is None:
            try:
                self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._collect()
                pytest.fail(f"{self.name} timed out\n{self.log()}")
            self._collect()
        return self

    def _collect(self):
        self.returncode = self.proc.returncode
        self.stdout = Path(self._out.name).read_text()
        self.stderr = Path(self._err.name).read_text()
        self._out.close()
        self._err.close()

    def log(self) -> str:
        return (f"--- {self.name}: exit {self.returncode}\n--- stdout\n{self.stdout}\n"
                f"--- stderr\n{self.stderr[-6000:]}")

    def check(self, returncode: int = 0) -> "Run":
        self.wait()
        assert self.returncode == returncode, self.log()
        return self

    def results(self) -> dict:
        """The JSON train.py prints at the end."""
        return json.loads(self.stdout[self.stdout.index("\n{\n"):])

    def started_at(self) -> int:
        match = re.search(r"^starting at step (\d+)", self.stdout, re.M)
        assert match, self.log()
        return int(match.group(1))


def train_rows(workdir: Path) -> dict[int, dict]:
    """{step: metrics} of the train steps (the last line of a step logged twice), without
    the timings."""
    rows = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss/total" in row:
            rows[row["step"]] = {k: v for k, v in row.items() if not k.startswith("perf/")}
    return rows


def eval_rows(workdir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (workdir / "metrics.jsonl").open())
            if "eval/psnr" in row}


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_export(workdir: Path, reference: Path):
    for name in ("export", "export_ema"):
        got = load_file(workdir / name / "diffusion_pytorch_model.safetensors")
        want = load_file(reference / name / "diffusion_pytorch_model.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def wait_for(predicate, run: Run, what: str, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if run.proc.poll() is not None:
            run.wait()
            pytest.fail(f"{run.name} ended before {what}\n{run.log()}")
        if time.monotonic() > deadline:
            run.proc.kill()
            run.wait()
            pytest.fail(f"{run.name}: no {what} in {timeout} s\n{run.log()}")
        time.sleep(0.02)


def error_lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def logged_step(workdir: Path, step: int) -> bool:
    try:
        return step in train_rows(workdir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half a line
        return False


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """Subprocess environment, with the session's tiny image VAE and compilation cache."""
    from cvvae_jax import ImageVAE
    from cvvae_jax.model_config import ImageVAEConfig

    image_vae = tmp_path_factory.mktemp("image_vae")
    ImageVAE.from_config(ImageVAEConfig(
        block_out_channels=(32, 32), layers_per_block=1, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2)).save_pretrained(image_vae)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    path = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(path),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               CVVAE_TEST_IMAGE_VAE=str(image_vae))
    return env


def image_vae_flag(env) -> str:
    return f"--config.image_vae.path={env['CVVAE_TEST_IMAGE_VAE']}"


@pytest.fixture(scope="session")
def reference(env, tmp_path_factory):
    """One device, 6 steps, uninterrupted; the final state is dumped. Started, not awaited,
    so that a test can run another process beside it."""
    root = tmp_path_factory.mktemp("reference")
    run = Run("reference", root / "run", env, image_vae_flag(env), worker=True,
              extra_env={"CVVAE_TEST_DUMP": str(root / "state")})
    yield run
    if run.proc.poll() is None:  # no test waited for it
        run.proc.kill()
        run.wait()


def reference_done(reference: Run) -> Run:
    reference.check()
    assert sorted(train_rows(reference.workdir)) == [1, 2, 3, 4, 5, 6], reference.log()
    assert saved_steps(reference.workdir) == [3, 6]
    return reference


# -- tests ---------------------------------------------------------------------------------


def test_fsdp_on_8_devices_matches_one_device(env, reference, tmp_path):
    """Mesh data=4 x fsdp=2 on 8 fake CPU devices: same metrics and final state as the
    1-device run to 1e-5, with parameters and Adam moments split over `fsdp`."""
    run = Run("sharded", tmp_path / "run", env, image_vae_flag(env), *SHARDED, worker=True,
              devices=8, extra_env={"CVVAE_TEST_DUMP": str(tmp_path / "state")})
    run.check()
    reference_done(reference)

    got, want = train_rows(run.workdir), train_rows(reference.workdir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step].keys() == want[step].keys()
        for k, v in want[step].items():
            np.testing.assert_allclose(got[step][k], v, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {k}")
    assert want[6]["lr/generator"] > 0 and want[6]["grad_norm/generator"] > 0
    assert want[1]["loss/total"] != want[6]["loss/total"]  # it trained
    for step, row in eval_rows(reference.workdir).items():
        np.testing.assert_allclose(eval_rows(run.workdir)[step]["eval/psnr"], row["eval/psnr"],
                                   rtol=1e-5)

    got_state = np.load(tmp_path / "state.npz")
    want_state = np.load(reference.workdir.parent / "state.npz")
    assert sorted(got_state.files) == sorted(want_state.files)
    for k in want_state.files:
        np.testing.assert_allclose(got_state[k], want_state[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert np.abs(want_state[".gen['vae']" + KERNEL]).max() > 0

    layout = json.loads((tmp_path / "state.json").read_text())
    fsdp = ["None", "None", "None", "None", "fsdp"]  # the largest dim, ties to the last
    for tree in (".gen['vae']", ".g_opt[1][0].mu['vae']", ".g_opt[1][0].nu['vae']", ".ema"):
        leaf = layout[tree + KERNEL]
        assert leaf == {"shape": [3, 3, 3, 32, 32], "spec": fsdp,
                        "shard_shape": [3, 3, 3, 32, 16], "devices": 8}, tree
        assert layout[tree + BIAS]["spec"] == [], tree  # 32 < fsdp_min_size: replicated
        assert layout[tree + BIAS]["shard_shape"] == [32], tree
    # Every leaf of the state (both networks, both optimizers, the EMA) follows the rule:
    # split iff it has >= fsdp_min_size elements and a dimension the fsdp size divides.
    split = {k for k, v in layout.items() if "fsdp" in v["spec"]}
    assert split == {k for k, v in layout.items()
                     if np.prod(v["shape"]) >= 4096 and any(d % 2 == 0 for d in v["shape"])}
    assert {k.split("[")[0] for k in split} == {".gen", ".disc", ".g_opt", ".d_opt", ".ema"}


def test_block_remat_matches_the_reference(env, reference, tmp_path):
    """`config.remat=blocks` recomputes every block of the CV-VAE and the image VAE in the
    backward pass: the same metrics as the reference run, which keeps the activations.
    Given a peak, it also logs the MFU; the reference, on a CPU with no peak given, does not."""
    run = Run("remat", tmp_path / "run", env, image_vae_flag(env), "--config.remat=blocks",
              "--config.peak_tflops_per_device=0.001")
    run.check()
    reference_done(reference)
    got, want = train_rows(run.workdir), train_rows(reference.workdir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        for k, v in want[step].items():
            np.testing.assert_allclose(got[step][k], v, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {k}")
    perf = [row for row in map(json.loads, (run.workdir / "metrics.jsonl").open()) if "perf/mfu" in row]
    assert perf, run.log()
    for row in perf:
        rate = row["perf/flops_per_step"] / row["perf/step_time_s"]
        np.testing.assert_allclose(row["perf/mfu"], rate / 1e9, rtol=1e-9)
    # The step time leaves the compile out: with it, the first was 34x their median here.
    times = [row["perf/step_time_s"] for row in perf]
    assert times[0] < 10 * np.median(times[1:]), times
    assert not any("perf/mfu" in line for line in (reference.workdir / "metrics.jsonl").open())


def launch_two(attempt: str, workdir: Path, env: dict, args: list[str], *, worker: bool = False,
               extra_env: dict | None = None, while_running=None) -> list[Run]:
    """Two processes x 2 devices on localhost; `while_running(runs)` is called once both
    started. Returns both runs, ended; fails unless both exit 0."""
    port = portpicker.pick_unused_port()
    runs = [Run(f"{attempt}_p{i}", workdir, env, *args, worker=worker, devices=2, extra_env={
        **(extra_env or {}), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        if while_running is not None:
            while_running(runs)
        # Until both end, one fails (its peer would then wait for it), or time is up.
        while (any(r.proc.poll() is None for r in runs)
               and all(r.proc.poll() in (None, 0) for r in runs)
               and time.monotonic() < runs[0].deadline):
            time.sleep(0.1)
    finally:  # never leave a process behind
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
    for run in runs:
        run.wait()
    assert [r.returncode for r in runs] == [0, 0], "\n".join(r.log() for r in runs)
    return runs


def test_two_processes_train_checkpoint_and_restore(env, tmp_path):
    """jax.distributed on localhost (gloo): 2 processes x 2 devices, FSDP over processes;
    3 steps and a checkpoint, then a second launch restores step 3; one process alone
    refuses the checkpoints, which hold each of the two processes' data position."""
    workdir = tmp_path / "run"
    args = [image_vae_flag(env), "--config.total_steps=3", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.fsdp_min_size=4096",
            "--config.data.sources[0].batch_size=1"]

    first = launch_two("first", workdir, env, args)
    assert [r.started_at() for r in first] == [0, 0]
    assert sorted(train_rows(workdir)) == [1, 2, 3]  # process 0 logs
    assert saved_steps(workdir) == [3]
    assert {p.name for p in (workdir / "checkpoints" / "3" / "data").iterdir()} >= {
        "process_0-of-2.json", "process_1-of-2.json"}
    shutil.copytree(workdir / "export", tmp_path / "first_export" / "export")
    shutil.copytree(workdir / "export_ema", tmp_path / "first_export" / "export_ema")

    second = launch_two("second", workdir, env, args)  # the finished run launched again: it only exports again
    for r in second:
        assert "nothing to train: the run is at step 3, config.total_steps is 3" in r.stdout, r.log()
    stderr = second[0].stderr + second[1].stderr
    assert "could not be restored" not in stderr
    assert "replacing checkpoint" not in stderr  # the finished run's step 3 is left alone
    assert sorted(train_rows(workdir)) == [1, 2, 3] and saved_steps(workdir) == [3]
    # The restored state, gathered from both processes, is the one the first launch ended with.
    assert_same_export(workdir, tmp_path / "first_export")

    alone = Run("one_process", workdir, env, *args, devices=4).check(2)
    assert error_lines(alone) == [
        f"error: the checkpoints in {workdir / 'checkpoints'} were saved by 2 processes, this run "
        "has 1: each process restores its own data position, so resume with 2 processes, or "
        "start afresh in a new workdir"], alone.log()
    assert "could not be restored" not in alone.stderr  # refused before any restore


def test_two_processes_save_on_ctrl_c(env, tmp_path):
    """Ctrl-C to one process of two: it sends itself SIGTERM, JAX's preemption service makes
    both stop at the same step and save it, and both exit 0."""
    workdir = tmp_path / "run"
    args = [image_vae_flag(env), "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.fsdp_min_size=4096", "--config.data.sources[0].batch_size=1"]

    def interrupt(runs):
        wait_for(lambda: logged_step(workdir, 1), runs[0], "step 1 in metrics.jsonl")
        runs[0].proc.send_signal(signal.SIGINT)

    # Batches after the first take 2 s: the signal lands mid-run.
    runs = launch_two("ctrl_c", workdir, env, args, worker=True, while_running=interrupt,
                      extra_env={"CVVAE_TEST_BATCH_DELAY_S": "2"})
    at = [r.results()["preempted_at"] for r in runs]
    assert at[0] == at[1] and 1 <= at[0] < 6, at
    at = int(at[0])
    assert "interrupted: stopping after this step to save it" in runs[0].stderr
    assert f"stopping at step {at} (SIGINT): saving\nsaved step {at}" in runs[0].stdout
    assert f"saved step {at}; the same command resumes the run" in runs[1].stdout
    assert saved_steps(workdir)[-1] == at
    assert {p.name for p in (workdir / "checkpoints" / str(at) / "data").iterdir()} >= {
        "process_0-of-2.json", "process_1-of-2.json"}


@pytest.fixture(scope="module")
def interrupted(env, reference, tmp_path_factory):
    """One workdir, three runs: SIGKILLed right after checkpoint 3 is on disk; resumed and
    sent SIGTERM after its first step; resumed again to the end. Without the session's
    compilation cache: the runs cache their compiles in the workdir (train.py's `xla_cache`)."""
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    killed = Run("killed", workdir, env, image_vae_flag(env), worker=True,
                 extra_env={"CVVAE_TEST_KILL_AT": "3"}).wait()
    steps_after_kill = saved_steps(workdir)
    # Batches after the first take 2 s: the signal lands mid-run, however busy the machine.
    preempted = Run("preempted", workdir, env, image_vae_flag(env), worker=True,
                    extra_env={"CVVAE_TEST_BATCH_DELAY_S": "2"})
    wait_for(lambda: logged_step(workdir, 4), preempted, "step 4 in metrics.jsonl")
    preempted.proc.send_signal(signal.SIGTERM)
    preempted.wait()
    steps_after_preemption = saved_steps(workdir)
    # JAX_LOG_COMPILES: JAX logs its persistent cache's hits as warnings.
    final = Run("final", workdir, env, image_vae_flag(env), extra_env={"JAX_LOG_COMPILES": "1"}).wait()
    return {"workdir": workdir, "killed": killed, "steps_after_kill": steps_after_kill,
            "preempted": preempted, "steps_after_preemption": steps_after_preemption,
            "final": final, "reference": reference_done(reference)}


def test_resume_after_sigkill_is_exact(interrupted):
    killed, preempted = interrupted["killed"], interrupted["preempted"]
    assert killed.returncode == -signal.SIGKILL, killed.log()
    assert interrupted["steps_after_kill"] == [3]
    reference = train_rows(interrupted["reference"].workdir)
    rows = train_rows(interrupted["workdir"])
    assert preempted.started_at() == 3, preempted.log()
    assert "from checkpoint step 3" in preempted.stdout
    # Steps 1-3 before the kill, 4-6 after it: all exactly the uninterrupted run's.
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert rows[step] == reference[step], step


def test_sigterm_saves_and_exits_then_resumes_exactly(interrupted):
    preempted, final = interrupted["preempted"], interrupted["final"]
    preempted.check(0)
    at = preempted.results()["preempted_at"]
    assert at in (4.0, 5.0), preempted.log()  # the step after the signal, before the end
    at = int(at)
    assert f"stopping at step {at} (SIGTERM): saving\nsaved step {at}; the same command resumes" \
        in preempted.stdout
    assert interrupted["steps_after_preemption"] == [3, at]
    final.check()
    assert final.started_at() == at, final.log()
    assert max(train_rows(interrupted["workdir"])) == 6
    assert saved_steps(interrupted["workdir"]) == [at, 6]
    # The resumed run loaded its step from the workdir's cache, and the final weights equal
    # the uninterrupted run's, bit for bit.
    assert any((interrupted["workdir"] / "xla_cache").iterdir())
    assert "Persistent compilation cache hit for 'jit_step'" in final.stderr, final.log()
    assert_same_export(interrupted["workdir"], interrupted["reference"].workdir)
    assert (final.results()["eval/psnr_after"]
            == interrupted["reference"].results()["eval/psnr_after"])


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(env, reference, tmp_path):
    reference_done(reference)
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir, workdir)
    (workdir / "metrics.jsonl").unlink()
    arrays = [p for p in (workdir / "checkpoints" / "6" / "state").rglob("d/*") if p.is_file()]
    assert arrays
    for p in arrays:
        os.truncate(p, p.stat().st_size // 2)

    run = Run("damaged", workdir, env, image_vae_flag(env)).check()
    assert re.search(r"checkpoint step 6 in \S+ could not be restored, trying an older one",
                     run.stderr), run.log()
    assert run.started_at() == 3 and "from checkpoint step 3" in run.stdout
    assert "replacing checkpoint step 6" in run.stderr  # the damaged step is rewritten
    rows, want = train_rows(workdir), train_rows(reference.workdir)
    assert sorted(rows) == [4, 5, 6]
    for step in rows:
        assert rows[step] == want[step], step
    assert saved_steps(workdir) == [3, 6]
    assert_same_export(workdir, reference.workdir)


@pytest.mark.parametrize("args,error", [
    (["--config.image_vae.path=/nonexistent"], "config.image_vae.path='/nonexistent' does not exist"),
    (["--config.optim.lrr=1"], "--config.optim.lrr: the config has no field 'lrr'; did you mean 'lr'?"),
    (["IMAGE_VAE", "--config.data.sources[0].size=9,9"],
     "config.data.sources[0] ('videos').size=(9, 9): (height, width), each a positive multiple of 2, "
     "the model's spatial compression"),
    (["IMAGE_VAE", "--config.data.sources[0].frames=6"],
     "config.data.sources[0] ('videos').frames=6: the causal encoder needs 1 + 4k frames (nearest valid: 5 or 9)"),
])
def test_bad_config_is_a_one_line_error(env, tmp_path, args, error):
    args = [image_vae_flag(env) if a == "IMAGE_VAE" else a for a in args]
    run = Run("bad_config", tmp_path / "run", env, *args).check(2)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {error}"], run.log()
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    assert not (tmp_path / "run").exists()  # it failed before creating anything


@pytest.mark.parametrize("args,extra_env,error", [
    (["--workdir=gs://bucket/run"], {},
     "--workdir=gs://bucket/run: only local or mounted paths are supported (mount a bucket, e.g. "
     "with gcsfuse, and pass the mount's path)"),
    (["--cluster_auto_detect"], {},
     "cannot join a multi-process run: --cluster_auto_detect found no cluster that JAX knows "
     "(Cloud TPU pod, SLURM, Open MPI, Kubernetes): elsewhere set JAX_COORDINATOR_ADDRESS, "
     "JAX_NUM_PROCESSES, JAX_PROCESS_ID on every process (JAX: coordinator_address should be "
     "defined.)"),
    ([], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"},
     "cannot join a multi-process run: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is "
     "not, and no cluster that JAX knows supplies them: set all three on every process (JAX: "
     "Number of processes must be defined.)"),
])
def test_bad_launch_is_a_one_line_error(env, tmp_path, args, extra_env, error):
    run = Run("bad_launch", tmp_path / "run", env, image_vae_flag(env), *args,
              extra_env=extra_env).check(2)
    assert error_lines(run) == [f"error: {error}"], run.log()
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists() and not (REPO / "gs:").exists()


@pytest.mark.parametrize("change,error", [
    ("--config.disc.ndf=64", "disc.ndf: 32 saved, 64 now"),
    ("--config.optim.grad_clip=0", "optim.grad_clip: 1.0 saved, 0.0 now"),
    ("--config.data.sources[0].name=clips", "data source names: ['videos'] saved, ['clips'] now"),
])
def test_changed_config_is_named_not_called_damage(env, reference, tmp_path, change, error):
    """A finished run launched again with a key that shapes the train state changed: none of
    its checkpoints restores, and the run names the change instead of calling them damaged."""
    reference_done(reference)
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir / "checkpoints", workdir / "checkpoints")
    run = Run("changed", workdir, env, image_vae_flag(env), change).check(2)
    assert error_lines(run) == [
        f"error: the checkpoints in {workdir / 'checkpoints'} were saved with another config and "
        f"do not restore into this one: {error}; use a new workdir, or set those keys back"], run.log()
    # Orbax's abandoned reads print nothing (thousands of lines before cli.quiet_libraries).
    assert len(run.stderr.splitlines()) < 10, run.log()
    assert saved_steps(workdir) == [3, 6]


def test_resume_notes_a_changed_global_batch(reference, monkeypatch, capsys):
    """The saved config records the device count; batch_size is per device, so a resume on
    another device count (or batch_size) notes the change of the global batch."""
    from configs import cvvae
    from cvvae_jax import trainer
    from cvvae_jax.run_checkpoint import RunCheckpointer

    with RunCheckpointer(reference_done(reference).workdir / "checkpoints", save_every=3,
                         keep_last=2) as ckpt:
        saved = ckpt.saved_config(3)
    assert saved["device_count"] == 1
    assert saved["data"]["sources"][0]["batch_size"] == 8
    config = cvvae.get_config("tiny")  # sources 'videos' (batch 2) and 'images' (batch 8)
    monkeypatch.setattr(trainer.jax, "device_count", lambda: 2)
    trainer._resume_notes(saved, config, 3)
    assert capsys.readouterr().out == (
        "note: config.total_steps is 150, 6 when step 3 was saved: the learning-rate schedule "
        "follows the new total\n"
        "note: source 'videos' takes 4 examples a step (2 per device x 2 devices), 8 when step 3 "
        "was saved (8 x 1): batch_size is per device\n")
