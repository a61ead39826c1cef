"""scripts/bench protocol: the wire protocol over loopback via pyvisa-py against the emulated tester.

(a) full read of a 512x784 array (401,408 float32 conductances) -> effective MB/s (conductance
    bytes delivered per second, the emulator's simulated read included);
(b) one program touching 10,000 devices (random addresses, 1..10 SET pulses) -> MB/s of program bytes.
Both side by side with the same bytes over a plain TCP socket in the same run (a server process
that answers a request line with that many bytes, or reads that many bytes and answers one line),
and the round trips each operation took. Goals: full read >= 100 MB/s; <= 2 round trips per op.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import numpy as np

from drivers import MockDriver, PulseProgram, TesterDriver
from drivers import protocol as P


def _plain_server(listener: socket.socket) -> None:
    """Answer 'SEND n' with n bytes, and 'TAKE n' + n bytes with one line: the raw-socket reference."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb")
    cache: dict[int, bytes] = {}
    while line := f.readline():
        verb, n = line.split()
        n = int(n)
        if verb == b"SEND":
            conn.sendall(cache.setdefault(n, bytes(n)))
        else:
            f.read(n)
            conn.sendall(b"1\n")
    conn.close()


def _recv_exact(sock: socket.socket, buf: bytearray) -> None:
    view = memoryview(buf)
    while view:
        k = sock.recv_into(view)
        if not k:
            raise ConnectionError("plain server closed")
        view = view[k:]


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    from hil.cli_emulator import EmulatorProcess

    ap = argparse.ArgumentParser(prog="scripts/bench protocol")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=784)
    ap.add_argument("--devices", type=int, default=10_000, help="devices one program touches")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.rows * args.cols
    rng = np.random.default_rng(args.seed)

    listener = socket.create_server(("127.0.0.1", 0))
    plain = mp.get_context("fork").Process(target=_plain_server, args=(listener,), daemon=True)
    plain.start()
    raw = socket.create_connection(listener.getsockname())
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rawf = raw.makefile("rb")

    with EmulatorProcess(["--rows", str(args.rows), "--cols", str(args.cols), "--seed", str(args.seed)]) as emu:
        drv = TesterDriver.open(emu.resource, timeout_s=30)
        read_bytes = len(P.encode_block(P.encode_read_reply(0.0, np.zeros(n, np.float32)))) + len(b"READ:ALL?\n") + 1
        buf = bytearray(read_bytes)

        def plain_read() -> None:
            raw.sendall(f"SEND {read_bytes}\n".encode())
            _recv_exact(raw, buf)

        def full_read() -> None:
            drv.read()

        # Interleaved so both see the same machine load; medians of each.
        full_read(), plain_read()
        rt0 = drv.stats.round_trips
        t_read = _median_s(full_read, args.repeats)
        rt_read = (drv.stats.round_trips - rt0) / args.repeats
        t_plain_read = _median_s(plain_read, args.repeats)
        sim = MockDriver(args.rows, args.cols, seed=args.seed)
        t_sim_read = _median_s(sim.read, args.repeats)

        programs = []
        for pid in range(1, args.repeats + 2):
            addr = rng.permutation(n)[: args.devices]
            programs.append(PulseProgram(pid, addr, rng.integers(1, 11, addr.size), np.zeros(addr.size, bool)))
        prog_msg = P.encode_message("PROG:APPL?", block=P.encode_program(programs[0]))
        it = iter(programs)

        def program() -> None:
            drv.apply(next(it))

        def plain_program() -> None:
            rawf_line = f"TAKE {len(prog_msg)}\n".encode()
            raw.sendall(rawf_line + prog_msg)
            rawf.readline()

        program(), plain_program()
        rt0 = drv.stats.round_trips
        t_prog = _median_s(program, args.repeats)
        rt_prog = (drv.stats.round_trips - rt0) / args.repeats
        t_plain_prog = _median_s(plain_program, args.repeats)
        p0 = programs[0]
        t_sim_prog = _median_s(lambda: sim.chip.apply(p0.addresses, p0.set_counts, p0.reset, sim.chip.now + 1.0),
                               args.repeats)
        drv.close()

    raw.close()
    plain.join(5)
    mb = 1e6
    g_bytes = n * 4
    print(f"wire protocol over loopback, pyvisa-py TCPIP SOCKET vs plain socket, {args.rows}x{args.cols} array, "
          f"medians of {args.repeats}")
    print(f"full read   : {t_read * 1e3:8.2f} ms  {g_bytes / t_read / mb:8.1f} MB/s effective "
          f"({read_bytes / t_read / mb:.1f} MB/s on the wire); plain socket, same bytes: {t_plain_read * 1e3:.2f} ms "
          f"({read_bytes / t_plain_read / mb:.1f} MB/s); ratio protocol/plain time {t_read / t_plain_read:.2f}; "
          f"round trips {rt_read:g}; of which the simulated read in-process: {t_sim_read * 1e3:.2f} ms")
    print(f"program     : {t_prog * 1e3:8.2f} ms  {len(prog_msg) / t_prog / mb:8.1f} MB/s ({args.devices} devices, "
          f"{len(prog_msg)} bytes); plain socket, same bytes: {t_plain_prog * 1e3:.2f} ms; "
          f"ratio protocol/plain time {t_prog / t_plain_prog:.2f}; round trips {rt_prog:g}; "
          f"of which the simulated pulses in-process: {t_sim_prog * 1e3:.2f} ms")
    goal_read = g_bytes / t_read / mb >= 100
    print(f"goals: full read >= 100 MB/s effective: {'met' if goal_read else 'NOT met'}; "
          f"<= 2 round trips per read and program: {'met' if max(rt_read, rt_prog) <= 2 else 'NOT met'}")
