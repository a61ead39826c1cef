"""scripts/bench model: programming and full-array reads of a 1,000,000-device simulated chip.

(a) programs each touching a random 1% of the devices with 1..10 SET pulses -> device-pulses/s;
(b) full-array reads with drift and read noise -> reads/s, and the ratio to a same-run numpy
    reference of the work any such read must do: one float32 standard-normal draw per device plus
    one pass over the state a drift read needs (G, programming time, nu).
Peak memory (tracemalloc, chip state + temporaries + the read result) is measured in a separate pass.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from sim import PCMArray


def _programs(n_devices: int, n_programs: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    k = n_devices // 100
    return [(rng.permutation(n_devices)[:k], rng.integers(1, 11, k)) for _ in range(n_programs)]


def _run_programs(chip: PCMArray, programs, t: float) -> float:
    for addr, counts in programs:
        t += 1.0
        chip.set_pulses(addr, counts, t)
    return t


def _reference_read(rng: np.random.Generator, chip: PCMArray, out: np.ndarray) -> None:
    rng.standard_normal(out=out, dtype=np.float32)
    out += chip._g
    out *= chip._nu
    chip._t_prog.max()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench model")
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--programs", type=int, default=100)
    ap.add_argument("--reads", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.devices

    programs = _programs(n, args.programs, args.seed)
    pulses = int(sum(c.sum() for _, c in programs))
    chip = PCMArray(n, seed=args.seed)
    _run_programs(chip, programs[:5], 0.0)  # warm-up

    t0 = time.perf_counter()
    t = _run_programs(chip, programs, 10.0)
    prog_s = time.perf_counter() - t0

    # Reads and the reference alternate, so both see the same machine load.
    rng = np.random.default_rng(args.seed + 1)
    ref_out = np.empty(n, np.float32)
    read_s = ref_s = 0.0
    for i in range(args.reads):
        t_read = t + 100.0 * (i + 1)
        a = time.perf_counter()
        chip.read(None, t_read)
        b = time.perf_counter()
        _reference_read(rng, chip, ref_out)
        c = time.perf_counter()
        read_s += b - a
        ref_s += c - b

    # Peak memory of a fresh chip doing the same work.
    tracemalloc.start()
    mem_chip = PCMArray(n, seed=args.seed)
    _run_programs(mem_chip, programs[:10], 0.0)
    mem_chip.read(None, 1e4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del mem_chip

    pulses_per_s = pulses / prog_s
    reads_per_s = n * args.reads / read_s
    ratio = read_s / ref_s
    bytes_per_dev = peak / n
    print(f"scripts/bench model: {n:,} devices, {args.programs} programs of {n // 100:,} devices "
          f"x 1..10 SET pulses, {args.reads} full reads")
    rows = [
        ("(a) device-pulses per second", f"{pulses_per_s / 1e6:.1f} M", ">= 20 M", pulses_per_s >= 20e6),
        ("(b) device reads per second", f"{reads_per_s / 1e6:.1f} M", "", None),
        ("(b) full read / numpy reference", f"{ratio:.2f}x ({read_s / args.reads * 1e3:.1f} ms vs "
         f"{ref_s / args.reads * 1e3:.1f} ms)", "<= 3x", ratio <= 3.0),
        ("peak memory per device", f"{bytes_per_dev:.1f} B", "<= 64 B", bytes_per_dev <= 64),
    ]
    for name, value, goal, ok in rows:
        verdict = "" if ok is None else ("met" if ok else "NOT MET")
        print(f"  {name:34s} {value:32s} {goal:9s} {verdict}")
