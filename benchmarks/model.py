"""scripts/bench model: programming and full-array reads of a 1,000,000-device simulated chip.

(a) programs each touching a random 1% of the devices with 1..10 SET pulses -> device-pulses/s;
(b) full-array reads with drift and read noise -> reads/s, and the ratio to a same-run numpy
    reference of the work any such read must do: one float32 standard-normal draw per device plus
    one pass over the state a drift read needs (G, programming time, nu).
Peak memory (tracemalloc, chip state + temporaries + the read result) is measured in a separate pass.

--backend torch: the same workload on the numpy model and on the torch model (sim/torch_model.py, on
--device, default cuda where torch sees one, else cpu), each program and each read alternating between the
two so both see the same machine load; both figures and the ratio torch / numpy, and the torch state per device.
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
    ap.add_argument("--backend", choices=("numpy", "torch"), default="numpy",
                    help="torch: the torch model's figures beside the numpy model's, same workload, same run")
    ap.add_argument("--device", default=None, help="--backend torch: cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="--backend torch on cpu: torch intra-op threads (default 1, "
                    "the trainer's update.torch_threads; on a busy machine more threads wait on each other)")
    args = ap.parse_args(argv)
    if args.backend == "torch":
        _compare_torch(args)
        return
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


def _compare_torch(args: argparse.Namespace) -> None:
    """The numpy and the torch model side by side on one workload: programs, then full reads, alternating."""
    import torch

    from sim.torch_model import DeviceUnavailable, TorchPCMArray

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads < 1:
        raise SystemExit(f"scripts/bench model: --threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    n = args.devices
    try:
        tch = TorchPCMArray(n, seed=args.seed, device=device)
    except DeviceUnavailable as e:
        raise SystemExit(f"scripts/bench model: --device {device}: {e}") from None
    ref = PCMArray(n, seed=args.seed)
    sync = torch.cuda.synchronize if tch.device.type == "cuda" else (lambda: None)
    programs = _programs(n, args.programs, args.seed)
    pulses = int(sum(c.sum() for _, c in programs))
    for chip in (ref, tch):  # warm-up (and, on CUDA, kernel loading)
        _run_programs(chip, programs[:5], 0.0)
        chip.read(None, 5.0)
    sync()
    spent = {"numpy": 0.0, "torch": 0.0}
    t = 10.0
    for addr, counts in programs:
        t += 1.0
        for name, chip in (("numpy", ref), ("torch", tch)):
            a = time.perf_counter()
            chip.set_pulses(addr, counts, t)
            sync()
            spent[name] += time.perf_counter() - a
    read_s = {"numpy": 0.0, "torch": 0.0}
    for i in range(args.reads):
        t_read = t + 100.0 * (i + 1)
        for name, chip in (("numpy", ref), ("torch", tch)):
            a = time.perf_counter()
            chip.read(None, t_read)  # into a float32 numpy array on the host, as the driver gets it
            read_s[name] += time.perf_counter() - a
    where = f"{tch.device.type} ({str(tch.dtype).removeprefix('torch.')}"
    where += f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})" if tch.device.type == "cpu" else f", {torch.cuda.get_device_name()})"
    print(f"scripts/bench model --backend torch: {n:,} devices, {args.programs} programs of {n // 100:,} devices "
          f"x 1..10 SET pulses, {args.reads} full reads; torch {torch.__version__} on {where}")
    pulse_rate = {k: pulses / v for k, v in spent.items()}
    read_rate = {k: n * args.reads / v for k, v in read_s.items()}
    read_ms = {k: v / args.reads * 1e3 for k, v in read_s.items()}
    rows = [
        ("(a) device-pulses per second", f"{pulse_rate['numpy'] / 1e6:.1f} M", f"{pulse_rate['torch'] / 1e6:.1f} M",
         pulse_rate["torch"] / pulse_rate["numpy"]),
        ("(b) device reads per second", f"{read_rate['numpy'] / 1e6:.1f} M", f"{read_rate['torch'] / 1e6:.1f} M",
         read_rate["torch"] / read_rate["numpy"]),
        ("(b) one full read", f"{read_ms['numpy']:.1f} ms", f"{read_ms['torch']:.1f} ms", None),
        ("chip state per device", f"{ref.nbytes / n:.0f} B", f"{tch.nbytes / n:.0f} B", None),
    ]
    print(f"  {'':34s} {'numpy':>12s} {'torch':>12s}   torch / numpy (speed)")
    for name, a, b, ratio in rows:
        print(f"  {name:34s} {a:>12s} {b:>12s}   {'' if ratio is None else f'{ratio:.2f}x'}")
