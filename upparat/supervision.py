"""The life of one supervised child, as a pure state machine.

No OS calls here: the supervisor feeds in what happened (spawned, beat,
exited, time passed) with ``now`` from ``time.monotonic()``, and asks what to
do next. That keeps the restart policy testable with a fake clock.

    STOPPED --spawned--> STARTING --up for running_after s--> RUNNING
    STARTING/RUNNING --exited 2 or 3--> FATAL        (structural fault)
    STARTING/RUNNING --exited otherwise--> BACKOFF --delay over--> (spawn)
    STARTING/RUNNING --no beat for the heartbeat bound--> hung() is True:
                        the supervisor kills it, and its exit goes to BACKOFF
    any --stop requested--> STOPPING --exited--> STOPPED

The restart delay starts at ``backoff_initial`` and doubles after every exit
up to ``backoff_max``, so a child that dies before doing any work is
throttled (Postfix master_spawn.c) instead of spinning; a child that earned
RUNNING starts again from ``backoff_initial`` (Supervisor process.py).

Heartbeats (zguide's Paranoid Pirate): a child must beat within
``first_beat_within`` s of its start and then at least every
``heartbeat_timeout`` s; otherwise it is alive but not working (stopped,
deadlocked) and ``hung()`` says so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from upparat import codes

# Exit codes that no restart can fix: bad configuration, or a child that
# found its privileges not dropped.
STRUCTURAL_EXITS = frozenset({codes.EXIT_USAGE, codes.EXIT_UNSAFE})


class State(enum.Enum):
    STOPPED = "STOPPED"  # not started yet, or stopped on request
    STARTING = "STARTING"  # spawned, has not yet stayed up running_after s
    RUNNING = "RUNNING"  # stayed up long enough; next crash restarts quickly
    BACKOFF = "BACKOFF"  # exited unexpectedly; waits restart_at to be spawned
    STOPPING = "STOPPING"  # asked to stop; waits for the exit
    FATAL = "FATAL"  # a structural fault; never restarted


@dataclass(frozen=True)
class Policy:
    running_after: float = 5.0  # seconds up before STARTING becomes RUNNING
    backoff_initial: float = 0.5
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    heartbeat_timeout: float = 10.0  # silence after a beat that makes a child hung
    first_beat_within: float = 30.0  # a fresh interpreter on a slow device imports a lot


class ChildMachine:
    """Restart policy and state of one child. All times are monotonic seconds."""

    def __init__(self, name: str, policy: Policy | None = None):
        self.name = name
        self.policy = policy or Policy()
        self.state = State.STOPPED
        self.delay = self.policy.backoff_initial  # the next restart delay
        self.started_at: float | None = None
        self.restart_at: float | None = None
        self.last_exit: int | None = None
        self.last_beat: float | None = None  # of the current process
        self.spawns = 0

    def __repr__(self) -> str:
        return f"<ChildMachine {self.name} {self.state.value}>"

    # -- events ------------------------------------------------------------

    def spawned(self, now: float) -> None:
        if self.state not in (State.STOPPED, State.BACKOFF):
            raise RuntimeError(f"{self.name}: spawned while {self.state.value}")
        self.state = State.STARTING
        self.started_at = now
        self.restart_at = None
        self.last_beat = None
        self.spawns += 1

    def beat(self, now: float) -> None:
        """The child's main loop said it is alive."""
        if self.alive:
            self.last_beat = now

    def exited(self, now: float, returncode: int | None) -> State:
        """The process is gone (returncode None: it could not be started).

        Returns the new state.
        """
        self.tick(now)  # a child that stayed up long enough earned RUNNING
        self.last_exit = returncode
        self.started_at = None
        self.last_beat = None
        if self.state is State.STOPPING:
            self.state = State.STOPPED
        elif returncode in STRUCTURAL_EXITS:
            self.state = State.FATAL
        elif self.state in (State.STARTING, State.RUNNING):
            self.state = State.BACKOFF
            self.restart_at = now + self.delay
            self.delay = min(self.delay * self.policy.backoff_factor, self.policy.backoff_max)
        else:
            raise RuntimeError(f"{self.name}: exited while {self.state.value}")
        return self.state

    def stop_requested(self) -> None:
        """Stop: a live child goes STOPPING, one waiting to restart STOPPED."""
        if self.state in (State.STARTING, State.RUNNING):
            self.state = State.STOPPING
        elif self.state is State.BACKOFF:
            self.state = State.STOPPED
            self.restart_at = None

    def reset(self) -> None:
        """Forget the backoff history (an operator asked for a restart)."""
        if self.state in (State.STOPPED, State.BACKOFF):
            self.state = State.STOPPED
            self.restart_at = None
        self.delay = self.policy.backoff_initial

    # -- time ----------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Advance time. Returns True when the child should be spawned now."""
        if self.state is State.STARTING and now - self.started_at >= self.policy.running_after:
            self.state = State.RUNNING
            self.delay = self.policy.backoff_initial
        return self.state is State.BACKOFF and now >= self.restart_at

    def beat_deadline(self) -> float | None:
        """When a live, unstopped child must have beaten (next) at the latest."""
        if self.state not in (State.STARTING, State.RUNNING):
            return None
        if self.last_beat is None:
            return self.started_at + self.policy.first_beat_within
        return self.last_beat + self.policy.heartbeat_timeout

    def hung(self, now: float) -> bool:
        """Alive but silent past its heartbeat bound: to be killed."""
        deadline = self.beat_deadline()
        return deadline is not None and now > deadline

    def next_deadline(self) -> float | None:
        """The next monotonic time at which tick() or hung() may change."""
        deadlines = [self.beat_deadline()]
        if self.state is State.STARTING:
            deadlines.append(self.started_at + self.policy.running_after)
        if self.state is State.BACKOFF:
            deadlines.append(self.restart_at)
        deadlines = [d for d in deadlines if d is not None]
        return min(deadlines) if deadlines else None

    @property
    def restarts(self) -> int:
        return max(0, self.spawns - 1)

    @property
    def alive(self) -> bool:
        """A process exists for this child (started, not yet reaped)."""
        return self.state in (State.STARTING, State.RUNNING, State.STOPPING)
