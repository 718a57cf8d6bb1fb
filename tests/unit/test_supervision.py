"""The child state machine (upparat/supervision.py) with a fake clock."""

import pytest

from upparat import codes
from upparat.supervision import ChildMachine, Policy, State

POLICY = Policy(running_after=5.0, backoff_initial=0.5, backoff_factor=2.0, backoff_max=30.0)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def advance(self, seconds):
        self.now += seconds
        return self.now


def started(clock):
    m = ChildMachine("fetcher", POLICY)
    m.spawned(clock.now)
    return m


def crash_and_restart(m, clock, returncode=1):
    """Exit now, wait exactly the backoff, spawn again; returns the delay waited."""
    m.exited(clock.now, returncode)
    delay = m.restart_at - clock.now
    assert not m.tick(clock.advance(delay - 0.01)), "restarted before its backoff was over"
    assert m.tick(clock.advance(0.01))
    m.spawned(clock.now)
    return delay


def test_backoff_doubles_on_fast_exits_and_caps_at_max():
    clock = Clock()
    m = started(clock)
    delays = [crash_and_restart(m, clock) for _ in range(10)]
    assert delays == pytest.approx([0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30])
    assert m.state is State.STARTING


def test_running_is_earned_only_after_staying_up_the_threshold():
    clock = Clock()
    m = started(clock)
    m.tick(clock.advance(4.9))
    assert m.state is State.STARTING
    assert m.next_deadline() == pytest.approx(clock.now + 0.1)
    m.tick(clock.advance(0.1))
    assert m.state is State.RUNNING
    assert m.next_deadline() == pytest.approx(m.started_at + POLICY.first_beat_within)  # only the heartbeat


def test_backoff_resets_after_running():
    clock = Clock()
    m = started(clock)
    for _ in range(5):
        crash_and_restart(m, clock)
    assert m.delay == pytest.approx(16)
    m.tick(clock.advance(5.0))
    assert m.state is State.RUNNING
    assert crash_and_restart(m, clock) == pytest.approx(0.5)


def test_exit_of_a_child_that_stayed_up_counts_as_running_even_without_tick():
    # The main loop may learn of the exit before it ticked past the threshold.
    clock = Clock()
    m = started(clock)
    for _ in range(3):
        crash_and_restart(m, clock)
    clock.advance(6.0)
    assert m.exited(clock.now, -9) is State.BACKOFF
    assert m.restart_at - clock.now == pytest.approx(0.5)


@pytest.mark.parametrize("code", [codes.EXIT_USAGE, codes.EXIT_UNSAFE])
@pytest.mark.parametrize("uptime", [0.1, 60.0])
def test_usage_or_unsafe_exit_is_fatal_and_never_restarted(code, uptime):
    clock = Clock()
    m = started(clock)
    assert m.exited(clock.advance(uptime), code) is State.FATAL
    assert not m.tick(clock.advance(3600))
    assert m.next_deadline() is None
    with pytest.raises(RuntimeError):
        m.spawned(clock.now)


@pytest.mark.parametrize("code", [0, 1, -9, -15, 4, None])
def test_other_exits_back_off_and_restart(code):
    clock = Clock()
    m = started(clock)
    assert m.exited(clock.advance(1), code) is State.BACKOFF
    assert m.tick(clock.advance(0.5))


def test_exit_while_stopping_is_a_stop_not_a_fault():
    clock = Clock()
    m = started(clock)
    m.stop_requested()
    assert m.state is State.STOPPING
    assert m.exited(clock.advance(1), codes.EXIT_UNSAFE) is State.STOPPED
    assert not m.tick(clock.advance(100))


def test_stop_during_backoff_cancels_the_restart():
    clock = Clock()
    m = started(clock)
    m.exited(clock.now, 1)
    m.stop_requested()
    assert m.state is State.STOPPED
    assert not m.tick(clock.advance(100))


def test_reset_forgets_backoff_history():
    clock = Clock()
    m = started(clock)
    for _ in range(4):
        crash_and_restart(m, clock)
    m.stop_requested()
    m.exited(clock.now, 0)
    m.reset()
    m.spawned(clock.now)
    assert crash_and_restart(m, clock) == pytest.approx(0.5)


def test_exit_reported_twice_is_our_bug_and_raises():
    clock = Clock()
    m = started(clock)
    m.exited(clock.now, 1)
    with pytest.raises(RuntimeError):
        m.exited(clock.now, 1)


# -- heartbeats ------------------------------------------------------------------


def test_a_child_that_never_beats_is_hung_after_the_first_beat_bound():
    clock = Clock()
    m = started(clock)
    assert not m.hung(clock.advance(POLICY.first_beat_within))
    assert m.beat_deadline() == pytest.approx(clock.now)
    assert m.hung(clock.advance(0.01))


def test_a_beating_child_is_never_hung():
    clock = Clock()
    m = started(clock)
    for _ in range(100):
        m.beat(clock.advance(POLICY.heartbeat_timeout - 0.1))
        m.tick(clock.now)
        assert not m.hung(clock.now)
    assert m.state is State.RUNNING


def test_silence_after_a_beat_makes_a_child_hung_after_the_heartbeat_timeout():
    clock = Clock()
    m = started(clock)
    m.beat(clock.advance(1))
    assert m.next_deadline() == pytest.approx(clock.now + min(POLICY.heartbeat_timeout, 4.0))
    clock.advance(POLICY.heartbeat_timeout)
    assert not m.hung(clock.now)
    assert m.hung(clock.advance(0.01))


def test_a_hung_child_killed_backs_off_and_starts_with_a_fresh_beat_bound():
    clock = Clock()
    m = started(clock)
    m.beat(clock.advance(6))  # RUNNING
    m.tick(clock.now)
    assert m.hung(clock.advance(POLICY.heartbeat_timeout + 1))
    assert m.exited(clock.now, -9) is State.BACKOFF
    assert not m.hung(clock.now) and m.beat_deadline() is None
    assert m.restart_at - clock.now == pytest.approx(POLICY.backoff_initial)
    assert m.tick(clock.advance(POLICY.backoff_initial))
    m.spawned(clock.now)
    assert m.last_beat is None and not m.hung(clock.advance(POLICY.heartbeat_timeout + 1))
    assert m.restarts == 1


def test_stopping_or_stopped_children_are_never_hung():
    clock = Clock()
    m = started(clock)
    m.stop_requested()
    assert not m.hung(clock.advance(3600))
    m.exited(clock.now, 0)
    m.beat(clock.now)  # a late line from the pipe changes nothing
    assert m.last_beat is None and not m.hung(clock.advance(3600))
