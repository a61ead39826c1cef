"""The driver contract: MockDriver, SafetyLimits (each limit refuses, names itself and the device,
nothing is sent) and DryRunDriver."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import (AddressError, ArrayDriver, DriverError, DryRunDriver, MockDriver, MockTiming, ProgramError,
                     PulseProgram, PulseShape, PulseShapes, Range, SafetyLimits, SafetyViolation)
from drivers.program import Block


def prog(pid=1, addr=(0, 1), counts=(1, 1), reset=(False, False), shapes=None) -> PulseProgram:
    return PulseProgram(pid, np.array(addr), np.array(counts), np.array(reset), shapes or PulseShapes())


# ---------------------------------------------------------------------------- MockDriver
def test_mock_reads_float32_in_address_order_with_its_clock():
    d = MockDriver(3, 4, seed=2)
    assert (d.geometry.rows, d.geometry.cols, d.geometry.n_devices) == (3, 4, 12)
    r = d.read([7, 2])
    assert r.conductances_us.dtype == np.float32 and r.addresses.tolist() == [7, 2] and r.t_s == 0.0
    assert d.now() == pytest.approx(1e-4 + 2e-7)
    whole = d.read()
    assert whole.conductances_us.shape == (12,) and whole.addresses.tolist() == list(range(12))


def test_mock_is_reproducible_from_its_seed_and_differs_across_seeds():
    def run(seed):
        d = MockDriver(4, 4, seed=seed)
        d.apply(prog(addr=range(16), counts=[3] * 16, reset=[False] * 16))
        return d.read().conductances_us
    assert np.array_equal(run(1), run(1)) and not np.array_equal(run(1), run(2))


def test_mock_apply_moves_conductance_counts_pulses_and_remembers_the_id():
    d = MockDriver(2, 2, seed=0)
    g0 = d.chip.conductance(None, d.now())
    d.apply(prog(7, addr=[1, 2], counts=[5, 0], reset=[False, True]))
    assert d.last_program_id() == 7
    assert d.lifetime_pulses.tolist() == [0, 5, 1, 0]
    g1 = d.chip.conductance(None, d.now())
    assert g1[1] > g0[1] and g1[0] == g0[0]
    # 5 SET pulses of 50 ns + 1 RESET of 50 ns, each followed by a 100 ns gap, plus the overhead.
    assert d.now() == pytest.approx(1e-4 + 6 * 150e-9)


def test_mock_timing_and_advance_set_the_simulated_clock():
    d = MockDriver(2, 2, timing=MockTiming(command_overhead_s=1.0, read_per_device_s=0.0))
    d.read()
    d.advance(2.5)
    assert d.now() == 3.5
    with pytest.raises(ValueError):
        d.advance(-1)


def test_mock_refuses_bad_addresses_and_closed_use():
    d = MockDriver(2, 2)
    with pytest.raises(AddressError, match="outside"):
        d.read([4])
    with pytest.raises(AddressError, match="more than once"):
        d.apply(prog(addr=[1, 1]))
    with pytest.raises(AddressError):
        d.read(np.array([[0]]))
    with d:
        pass
    assert d.closed
    with pytest.raises(DriverError, match="closed"):
        d.read()


def test_mock_analog_mvm_only_when_declared():
    d = MockDriver(4, 4, seed=3, analog_mvm=True)
    x = np.ones((1, 2))
    y = d.mvm(Block(1, 2, 0, 3), x)
    assert y.shape == (1, 3) and np.all(y > 0)
    assert d.mvm_t(Block(1, 2, 0, 3), np.ones((2, 3))).shape == (2, 2)
    with pytest.raises(DriverError, match="no analog multiply"):
        MockDriver(4, 4).mvm(Block(0, 1, 0, 1), x[:, :1])


def test_programs_validate_their_own_shape():
    with pytest.raises(ProgramError):
        PulseProgram(0, np.array([0]), np.array([1]), np.array([False]))
    with pytest.raises(ProgramError):
        PulseProgram(1, np.array([0, 1]), np.array([1]), np.array([False]))
    with pytest.raises(ProgramError, match="negative"):
        PulseProgram(1, np.array([0]), np.array([-1]), np.array([False]))


# ---------------------------------------------------------------------------- SafetyLimits
class Recorder(ArrayDriver):
    """A driver that records every program that reaches its transport side."""

    def __init__(self, limits: SafetyLimits, n: int = 16) -> None:
        from drivers.program import Geometry
        super().__init__(Geometry(1, n), limits)
        self.sent: list[PulseProgram] = []

    @property
    def identity(self) -> str:
        return "recorder"

    def _read(self, addresses, whole):
        raise AssertionError("not used")

    def _apply(self, program):
        self.sent.append(program)

    def _last_program_id(self):
        return None

    def _now(self):
        return 0.0


HOT = PulseShape(amplitude_ua=900.0, width_ns=50.0)
LONG = PulseShape(amplitude_ua=100.0, width_ns=5000.0)

CASES = [
    ("set_amplitude_ua", SafetyLimits(), prog(addr=[3], counts=[1], reset=[False],
                                              shapes=PulseShapes(set=HOT)), None),
    ("set_width_ns", SafetyLimits(), prog(addr=[3], counts=[1], reset=[False], shapes=PulseShapes(set=LONG)), None),
    ("reset_amplitude_ua", SafetyLimits(), prog(addr=[3], counts=[0], reset=[True],
                                                shapes=PulseShapes(reset=PulseShape(amplitude_ua=50, width_ns=50))), None),
    ("reset_width_ns", SafetyLimits(), prog(addr=[3], counts=[0], reset=[True],
                                            shapes=PulseShapes(reset=PulseShape(amplitude_ua=450, width_ns=5))), None),
    ("max_set_pulses_per_device", SafetyLimits(max_set_pulses_per_device=4), prog(addr=[2, 5], counts=[4, 5]), 5),
    ("max_devices_per_program", SafetyLimits(max_devices_per_program=1), prog(addr=[2, 5]), None),
    ("lifetime_pulse_budget", SafetyLimits(lifetime_pulse_budget=3), prog(addr=[2, 6], counts=[3, 4]), 6),
    ("address range", SafetyLimits(address_min=4), prog(addr=[5, 3]), 3),
    ("address range", SafetyLimits(address_max=9), prog(addr=[5, 11]), 11),
]


@pytest.mark.parametrize("limit,limits,program,device", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_limit_refuses_names_itself_and_the_device_and_nothing_is_sent(limit, limits, program, device):
    d = Recorder(limits)
    with pytest.raises(SafetyViolation) as e:
        d.apply(program)
    assert e.value.limit == limit and e.value.device == device
    assert limit in str(e.value) and (device is None or f"device {device}" in str(e.value))
    assert d.sent == [] and d.lifetime_pulses.sum() == 0


def test_unused_pulse_shapes_are_not_checked():
    d = Recorder(SafetyLimits())
    d.apply(prog(addr=[0], counts=[0], reset=[True], shapes=PulseShapes(set=HOT)))
    assert len(d.sent) == 1


def test_lifetime_budget_counts_earlier_programs():
    d = Recorder(SafetyLimits(lifetime_pulse_budget=5))
    d.apply(prog(1, addr=[0], counts=[3], reset=[False]))
    d.apply(prog(2, addr=[0], counts=[1], reset=[True]))
    with pytest.raises(SafetyViolation, match="lifetime_pulse_budget"):
        d.apply(prog(3, addr=[0], counts=[1], reset=[False]))
    assert len(d.sent) == 2 and d.lifetime_pulses[0] == 5


def test_limits_validate_at_the_edge():
    with pytest.raises(ValueError):
        Range(min=2, max=1)
    with pytest.raises(ValueError):
        SafetyLimits(max_set_pulses_per_device=0)
    with pytest.raises(ValueError):
        SafetyLimits(typo=1)
    assert SafetyLimits.model_validate_json(SafetyLimits().model_dump_json()) == SafetyLimits()


# ---------------------------------------------------------------------------- DryRunDriver
def test_dry_run_records_programs_and_leaves_the_chip_alone():
    inner = MockDriver(2, 3, seed=4)
    before = inner.chip.pulses_since_reset().copy()
    dry = DryRunDriver(inner)
    dry.apply(prog(3, addr=[0, 5], counts=[2, 1]))
    assert [p.program_id for p in dry.programs] == [3] and dry.last_program_id() == 3
    assert np.array_equal(inner.chip.pulses_since_reset(), before) and inner.last_program_id() is None
    assert dry.lifetime_pulses.tolist() == [2, 0, 0, 0, 0, 1]
    assert dry.identity.startswith("dry-run of pcm-hil,MockDriver")
    assert np.array_equal(dry.read([1]).conductances_us, MockDriver(2, 3, seed=4).read([1]).conductances_us)


def test_dry_run_refuses_what_the_chip_would_refuse():
    dry = DryRunDriver(MockDriver(2, 3, limits=SafetyLimits(max_set_pulses_per_device=1)))
    with pytest.raises(SafetyViolation, match="max_set_pulses_per_device"):
        dry.apply(prog(addr=[0], counts=[2], reset=[False]))
    assert dry.programs == []


def test_a_program_keeps_read_only_arrays_of_its_own():
    """A checked program cannot change behind the driver's back (its read-back skips a second check)."""
    addr, cnt, rst = np.array([3, 1]), np.array([2, 0]), np.array([False, True])
    p = PulseProgram(1, addr, cnt, rst)
    addr[0], cnt[0], rst[0] = 99, 50, True
    assert p.addresses.tolist() == [3, 1] and p.set_counts.tolist() == [2, 0] and p.reset.tolist() == [False, True]
    for a in (p.addresses, p.set_counts, p.reset):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
    assert addr.flags.writeable  # the caller's arrays are left as they were
