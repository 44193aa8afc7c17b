"""This CPU's peak FLOP rate per vector instruction: the denominator of a CPU MFU.

    python benchmarks/cpu_peak.py [--runs 5] [--json PATH]

Times loops of one multiply-add instruction, 24 independent accumulators (12 in AVX2's 16
registers) so that the instruction's throughput, not its latency, sets the pace, on one
core and on all usable ones: fp32 FMA on 256-bit (AVX2) and 512-bit (AVX-512) registers,
and the bf16 dot product `vdpbf16ps` (AVX512_BF16: bf16 pairs summed into f32), each unit
the CPU lists in /proc/cpuinfo. The loops are inline assembly built with the system's C
compiler (`cc`, or $CC), so nothing is optimised away. The all-core rate of each unit is
the peak to pass as `codec.py --peak-tflops` / `train_step.py --peak-tflops` for a CPU MFU
(the fp32 FMA's for fp32 runs, the bf16 dot's for bf16 runs), and bf16 over fp32 is the
most bf16 compute can gain on this CPU's vector units. AMX tiles (Xeon Sapphire Rapids and
later), which XLA:CPU's bf16 dots use where present, are faster still and not measured
here. x86-64 Linux only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

# name, cpuinfo flags it needs, instruction, register prefix, FLOP per instruction
UNITS = (
    ("fp32 FMA, AVX2", ("avx2", "fma"), "vfmadd231ps", "ymm", 16),
    ("fp32 FMA, AVX-512", ("avx512f",), "vfmadd231ps", "zmm", 32),
    ("bf16 dot, AVX512_BF16", ("avx512_bf16",), "vdpbf16ps", "zmm", 64),
)
SECONDS_PER_RUN = 0.5


def accumulators(reg: str) -> int:
    """Independent chains per thread: 32 vector registers with AVX-512, 16 without."""
    return 24 if reg == "zmm" else 12


def kernel(index: int, instruction: str, reg: str) -> str:
    """A C function looping `n` times over `accumulators(reg)` independent `instruction`s into
    registers 0 .. k-1 from the zeroed sources k and k+1."""
    k = accumulators(reg)
    zero = "vpxord" if reg == "zmm" else "vxorps"
    body = "".join(f'"{instruction} %%{reg}{k}, %%{reg}{k + 1}, %%{reg}{i}\\n\\t"' for i in range(k))
    clobbers = ", ".join(f'"xmm{i}"' for i in range(k + 2))
    target = '__attribute__((target("avx512f"))) ' if reg == "zmm" else ""
    return (f"{target}static void *unit{index}(void *arg) {{\n"
            f"  long n = *(long *)arg;\n"
            f'  __asm__ volatile("{zero} %%{reg}{k}, %%{reg}{k}, %%{reg}{k}\\n\\t"\n'
            f'                   "{zero} %%{reg}{k + 1}, %%{reg}{k + 1}, %%{reg}{k + 1}\\n\\t"\n'
            f'                   "1:\\n\\t" {body} "dec %0\\n\\tjnz 1b" : "+r"(n) : : {clobbers});\n'
            f"  return 0;\n}}\n")


def source() -> str:
    """The C program: `peak UNIT THREADS ITERATIONS` prints the seconds that THREADS threads
    took to run unit UNIT's loop ITERATIONS times each."""
    units = "".join(kernel(i, ins, reg) for i, (_, _, ins, reg, _) in enumerate(UNITS))
    table = ", ".join(f"unit{i}" for i in range(len(UNITS)))
    return f"""#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
{units}
static void *(*units[])(void *) = {{{table}}};
int main(int argc, char **argv) {{
  int unit = atoi(argv[1]), threads = atoi(argv[2]);
  long n = atol(argv[3]);
  pthread_t t[threads];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, units[unit], &n);
  for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.9f\\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9);
  return 0;
}}
"""


def build(workdir: Path) -> Path:
    wanted = os.environ.get("CC", "cc")
    cc = shutil.which(wanted) or ("CC" not in os.environ and shutil.which("gcc"))
    if not cc:
        sys.exit(f"error: no C compiler found ({wanted}{'' if 'CC' in os.environ else ' or gcc'}); "
                 "cpu_peak.py builds its loops with one (set $CC)")
    src, exe = workdir / "peak.c", workdir / "peak"
    src.write_text(source())
    done = subprocess.run([cc, "-O2", "-pthread", str(src), "-o", str(exe)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {cc} could not build the loops (an assembler without AVX512_BF16?):\n{done.stderr}")
    return exe


def seconds(exe: Path, unit: int, threads: int, iterations: int) -> float:
    out = subprocess.run([str(exe), str(unit), str(threads), str(iterations)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


def measure(exe: Path, unit: int, threads: int, runs: int) -> dict:
    flop_per_iteration = accumulators(UNITS[unit][3]) * UNITS[unit][4]
    # Size the loop from a short probe so that each run takes about SECONDS_PER_RUN.
    probe = 10**6
    iterations = max(probe, int(probe * SECONDS_PER_RUN / seconds(exe, unit, threads, probe)))
    times = [seconds(exe, unit, threads, iterations) for _ in range(runs)]
    rates = [threads * iterations * flop_per_iteration / t / 1e9 for t in times]
    return {"unit": UNITS[unit][0], "threads": threads, "iterations": iterations, "times_s": times,
            "gflops_median": statistics.median(rates), "gflops_best": max(rates)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.uname().machine != "x86_64":
        sys.exit(f"error: cpu_peak.py times x86-64 instructions; this machine is {os.uname().machine}")
    flags = set((common.cpuinfo("flags") or "").split())
    units = [i for i, unit in enumerate(UNITS) if all(f in flags for f in unit[1])]
    if not units:
        sys.exit("error: /proc/cpuinfo lists none of avx2+fma, avx512f, avx512_bf16")
    cores = common.usable_cpus()
    mach = common.machine()
    print(common.machine_line(mach))
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        results = [measure(exe, u, t, args.runs) for u in units for t in sorted({1, cores})]
    print(f"median (best) of {args.runs} run(s), GFLOP/s; {accumulators('zmm')} independent chains per thread"
          f" ({accumulators('ymm')} on AVX2)")
    counts = sorted({r["threads"] for r in results})
    rows = []
    for u in units:
        rs = {r["threads"]: r for r in results if r["unit"] == UNITS[u][0]}
        rows.append([UNITS[u][0], str(UNITS[u][4])] +
                    [common.rate_cell(rs[t]) for t in counts])
    print(common.table(["unit", "FLOP / instruction"] + [f"{t} thread(s)" for t in counts], rows))
    peak = {r["unit"]: r["gflops_median"] for r in results if r["threads"] == cores}
    fp32 = peak.get(UNITS[1][0]) or peak.get(UNITS[0][0])
    bf16 = peak.get(UNITS[2][0])
    if fp32:
        print(f"--peak-tflops for fp32 runs: {fp32 / 1e3:.3g}")
    if bf16:
        print(f"--peak-tflops for bf16 runs: {bf16 / 1e3:.3g} (vector units; bf16 / fp32 {bf16 / fp32:.2f}x)")
    if "amx_bf16" in flags:
        print("this CPU has AMX, whose bf16 tiles XLA:CPU uses and this script does not measure")
    common.write_json(args.json, {"benchmark": "cpu_peak", "machine": mach, "results": results})


if __name__ == "__main__":
    main()
