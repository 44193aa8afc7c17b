"""Where one network call spends its time, op by op: XLA's per-op profile of encode or decode.

    python benchmarks/op_profile.py [--direction decode] [--shape 17x256x256] [--dtype bf16] [--top 25]

Builds the default-config v1 CV-VAE (random weights), compiles one network call on the
whole clip (no tiling or chunking: `encode_moments` / `decode_latents`), runs it once
untimed and once under `jax.profiler`, then sums the trace's events per compiled op
(XLA's thunks: `ynn_fusion*` are YNNPACK's matmuls, `*_fusion` XLA's fused loops,
`convolution*` its convolutions) and prints the ops that took longest, each with the
shape it writes and the ops fused in it (from the compiled HLO), plus the totals per
kind. XLA:CPU runs independent ops side by side and ops inside loops once per trip
(the `calls` column), so the op times add up to more than the wall time: read them as
shares, not as a schedule. This is the profile that shaped `shifted_matmul`,
`upsample`'s frame-by-frame form and the loops' bf16 bits (`frame_loop.as_bits`).

On a GPU the events summed are the device's kernels, each under the HLO op that
launched it (`cudnn-conv-*` are cuDNN's convolutions). XLA:GPU replays runs of small
kernels as CUDA graphs, which the trace shows as `command_buffer_*` only; XLA's flag
`--xla_gpu_enable_command_buffer=` (empty, in XLA_FLAGS) launches them one by one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import common  # noqa: F401 - puts the repository root on sys.path

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from codec import CONFIGS, parse_shape  # noqa: E402
from common import dtype_list, fmt, machine, machine_line, table, timed  # noqa: E402
from cvvae_jax.model_config import CVVAEConfig  # noqa: E402
from cvvae_jax.pretrained import jitted_part  # noqa: E402
from cvvae_jax.vae import CVVAE  # noqa: E402
from stages import input_shape  # noqa: E402

# Profiler events that are not compiled ops: the runtime and the Python around the call.
NOT_OPS = ("ThunkExecutor", "$", "Pjit", "CommonPjRt", "Slinky", "while")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--direction", choices=("encode", "decode"), default="decode")
    p.add_argument("--shape", type=parse_shape, default=(17, 256, 256), help="T x H x W of the clip")
    p.add_argument("--dtype", default="bf16", help="compute dtype (fp32 or bf16)")
    p.add_argument("--top", type=int, default=25, help="ops to list")
    args = p.parse_args(argv)
    args.dtype, = dtype_list(p, args.dtype)
    return args


def op_descriptions(hlo: str) -> dict[str, str]:
    """op name -> 'shape written; fused ops' from compiled HLO text."""
    bodies = {}
    for block in hlo.split("\n\n"):
        m = re.match(r"%?([\w.\-]+)", block.strip())
        if m:
            bodies[m.group(1)] = block
    found = {}
    for line in hlo.splitlines():
        # Tuple shapes (cuDNN's convolutions write one with their scratch) hold spaces.
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w-]+)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", line)
        inner = ""
        if called and called.group(1) in bodies:
            ops = collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", bodies[called.group(1)]))
            inner = ", ".join(f"{k} x{v}" for k, v in ops.most_common(4) if k not in ("parameter", "bitcast"))
        found[name] = f"{shape}; {inner or op}"
    return found


def device_pids(events) -> set[int]:
    """The trace's accelerator processes (their events are kernels, named by the HLO op that
    launched them); empty on CPU, where the compiled ops run as host events."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}


def kind(name: str) -> str:
    base = re.sub(r"[.\d]+$", "", name)
    return "YNNPACK matmul" if base == "ynn_fusion" else base


def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine_line(machine()))
    cfg = CVVAEConfig.from_dict(json.loads(CONFIGS["default"].read_text()))
    vae = CVVAE.from_config(cfg, dtype=jax.numpy.dtype(args.dtype), seed=0)
    graphdef, state = nnx.split(vae)
    fn = jitted_part(graphdef, "encode_moments" if args.direction == "encode" else "decode_latents")
    x = jax.random.normal(jax.random.key(0), input_shape(args.direction, args.shape))
    compiled = fn.lower(state, x).compile()
    about = op_descriptions(compiled.as_text())
    jax.block_until_ready(compiled(state, x))
    with tempfile.TemporaryDirectory(prefix="cvvae_op_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        wall, _ = timed(lambda: compiled(state, x))
        jax.profiler.stop_trace()
        trace_file, = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    on_device = device_pids(events)
    seconds, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (on_device and e.get("pid") not in on_device):
            continue
        name = e.get("args", {}).get("hlo_op") or e["name"]
        if not name.startswith(NOT_OPS):
            seconds[name] += e.get("dur", 0) / 1e6
            calls[name] += 1
    kinds = collections.Counter()
    for name, s in seconds.items():
        kinds[kind(name)] += s
    print(f"{args.direction} {'x'.join(map(str, args.shape))}, {args.dtype}: wall {wall:.2f} s, "
          f"ops {sum(seconds.values()):.2f} s (summed over every core, stream and loop trip)")
    print(table(["kind", "s"], [[k, fmt(s, ".2f")] for k, s in kinds.most_common(10)]))
    print(table(["op", "calls", "s", "writes; fused ops"],
                [[n, str(calls[n]), fmt(s, ".3f"), about.get(n, "")] for n, s in seconds.most_common(args.top)]))


if __name__ == "__main__":
    main()
