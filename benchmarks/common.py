"""Shared pieces of the benchmark scripts: the machine line, the input clip, timing,
per-case subprocesses (so that each case's peak memory is its own), markdown and JSON.

Not a benchmark itself; `codec.py`, `image_vae_reference.py` and `train_step.py`
import it (run them from anywhere: the repository root is put on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # cvvae_jax and configs/ without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from cvvae_jax import assets, dtypes, flops, media  # noqa: E402

RESULT_PREFIX = "RESULT "
CLIP = "clip_a.mp4"


def cpuinfo(field: str) -> str | None:
    """The first `field` line's value in Linux's /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable_cpus(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "python": platform.python_version()}


def machine_line(m: dict[str, Any]) -> str:
    return (f"machine: {m['cpu']}, {m['cpu_count']} CPU core(s) ({m['cpus_usable']} usable); "
            f"jax {m['jax']}, jaxlib {m['jaxlib']}; backend {m['backend']}, "
            f"{m['device_count']} x {m['device_kind']}")


def peak_rss_mib() -> float:
    """This process' peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib() -> float | None:
    """Peak bytes in use on device 0, where the backend reports it (GPU/TPU, not CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator stats raise or return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def clip_frames(frames: int, height: int, width: int) -> np.ndarray:
    """(frames, height, width, 3) float32 in [-1, 1] from the bundled clip: the first
    frames (looped if the clip is shorter), scaled to cover the size, centre-cropped."""
    video, _ = media.read_video(assets.path(CLIP), max_frames=frames)
    video = video[np.arange(frames) % video.shape[0]]
    return media.to_float(media.cover_and_crop(video, (height, width)))


def block(tree):
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of fn(), waiting for its device work."""
    start = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - start, out


def time_runs(fn: Callable[[], Any], *, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        block(fn())
    return [timed(fn)[0] for _ in range(runs)]


def summary(times: Sequence[float]) -> dict[str, float | None]:
    """Median and min of timed runs; None for both when there were none (first call only)."""
    if not times:
        return {"median_s": None, "min_s": None, "times_s": []}
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": list(times)}


def emit(result: dict[str, Any]) -> None:
    """A child's result, as the one line its parent reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, argv: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run `python script argv...` in a fresh process; its RESULT line as a dict.

    stderr goes straight to ours (compile warnings, errors); a failed child gives
    {"error": ...} so the table shows the failure instead of stopping the run.
    """
    cmd = [sys.executable, str(script), *argv]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        rc = proc.returncode
        why = "killed (out of memory?)" if rc in (-9, 137) else f"exit status {rc}"
        return {"error": why}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def announce(n: int, total: int, label: str) -> Callable[[dict[str, Any]], None]:
    """Print "[n/total] label ..." on stderr; the returned function prints its outcome and time."""
    print(f"[{n}/{total}] {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()

    def done(result: dict[str, Any]) -> None:
        print(f"[{n}/{total}] {label}: {result.get('error', 'done')} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    return done


def print_machine(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Print the machine line of the first case that ran; return its machine dict."""
    mach = next((r["machine"] for r in results if "machine" in r), None)
    print(machine_line(mach) if mach else f"machine: {cpu_model()} (no case ran)")
    return mach


def fmt(value, spec: str = ".3g", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return format(value, spec)


def rate_cell(result: dict[str, Any]) -> str:
    """A result's `gflops_median` (`gflops_best`) as a table cell."""
    return f"{result['gflops_median']:.0f} ({result['gflops_best']:.0f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {path}")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def dtype_list(parser, text: str) -> list[str]:
    """Comma-separated compute dtypes as numpy names (fp32/bf16 accepted); a parser error otherwise."""
    try:
        return [dtypes.canonical(d, what="") for d in csv_list(text)]
    except ValueError as e:
        parser.error(f"--dtype {str(e).strip()}")


def peak_tflops(given: float | None, mach: dict[str, Any] | None) -> tuple[float | None, str]:
    """The per-device peak for MFU and where it came from: --peak-tflops, else the device's
    dense bf16 peak (`cvvae_jax.flops.peak_tflops`, which knows none for a CPU)."""
    if given is not None:
        return given, "--peak-tflops"
    if mach is None:
        return None, ""
    return flops.peak_tflops(mach["device_kind"]), "dense bf16 peak of the device"


def mfu_line(peak: float | None, source: str, devices: int) -> str:
    return "MFU: " + (f"against {peak:g} TFLOP/s per device ({source}) x {devices}" if peak else
                      "n/a (no peak known for this device; pass --peak-tflops)")
