"""The installer's allow-list: every request it acts on, and when (OpenSSH
monitor.c ``mon_dispatch`` style). One literal table; a request that is not
in it, or whose conditions do not all hold now, is refused whole with the
first failing reason, and nothing of it is done.

Columns:
- the key: request type, and for ``run_hook`` the hook name;
- ``answer``: ``Installer.answer_<type>``, paired with the broker's call of
  the same name;
- ``phases``: the phases of the named job execution in which it is permitted
  (``none``: the installer has no record of it; see installer_protocol.PHASES);
  ``ANY_PHASE`` for requests that change nothing or that always may;
- ``once``: ``ONCE`` steps happen at most once per job execution, and
  ``PER_ROUND`` hook runs at most once per round; a repeat is answered with
  the current state and never done twice (``MANY``: answered afresh);
- ``requires``: further conditions, each returning a ``Refusal`` or None.

Refusals: ``not_permitted`` (never in this state; the broker must not retry
as is) or ``busy`` (a hook or staging runs; the installer pushes the job's
state when it ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from upparat.ipc import installer_protocol as ip
from upparat.ipc.installer_protocol import (
    DISCARDED, FAILED, INSTALL_INTERRUPTED, INSTALLED, INSTALLING, NONE, OPENED, PHASES, RESTART_INTERRUPTED,
    RESTARTED, RESTARTING,
    STAGED, STAGING,
)
from upparat.ipc.wire import BUSY, NOT_PERMITTED, Message, Refusal

from .installer import Installer

ANY_PHASE = frozenset(PHASES)
ONCE = "once per job execution"
PER_ROUND = "once per round"
MANY = "every time"


# ----- conditions: each returns the Refusal, or None -------------------------------
def configured(installer: Installer, message: ip.RunHook) -> Refusal | None:
    if installer.settings.hooks.command(message.hook) is None:
        return Refusal(NOT_PERMITTED, f"the {message.hook} hook is not configured ([hooks] {message.hook})")
    return None


def idle(installer: Installer, message: Message) -> Refusal | None:
    if installer.busy():
        return Refusal(BUSY, installer.busy_reason())
    return None


def no_other_job_open(installer: Installer, message: ip.OpenJob) -> Refusal | None:
    job = installer.state.job
    if job is not None and job.ids != (message.job_id, message.execution):
        return Refusal(BUSY, f"busy: job {job.job_id} execution {job.execution} is open ({job.phase}); discard "
                             "it first")
    return None


def staged_here(installer: Installer, message: ip.RunHook) -> Refusal | None:
    """install only on a file this installer staged and verified for this job execution."""
    job = installer.open_job(message.job_id, message.execution)
    if job.staged_sha256 is None or job.staged_size is None:
        return Refusal(NOT_PERMITTED, f"install refused: job {job.job_id} execution {job.execution} has no file "
                                      "staged and verified by the installer")
    return None


@dataclass(frozen=True)
class Rule:
    answer: Callable[[Installer, Message], Message]
    phases: frozenset[str]
    once: str
    requires: tuple[Callable[[Installer, Message], Refusal | None], ...] = ()


def _phases(*names: str) -> frozenset[str]:
    return frozenset(names)


# The allow-list. Nothing else reaches root.
#
#  request      hook        answer                      phases                                     once       requires
ALLOW: dict[tuple[str, str | None], Rule] = {
    ("ping", None):            Rule(Installer.answer_ping,      ANY_PHASE,                          MANY),
    ("query_job", None):       Rule(Installer.answer_query_job, ANY_PHASE,                          MANY),
    ("open_job", None):        Rule(Installer.answer_open_job,  _phases(NONE),                      ONCE,
                                    (no_other_job_open,)),
    ("stage", None):           Rule(Installer.answer_stage,     _phases(OPENED),                    ONCE, (idle,)),
    ("run_hook", "version"):   Rule(Installer.answer_run_hook,  _phases(OPENED, RESTARTED),         PER_ROUND,
                                    (configured, idle)),
    ("run_hook", "download"):  Rule(Installer.answer_run_hook,  _phases(OPENED),                    PER_ROUND,
                                    (configured, idle)),
    ("run_hook", "install"):   Rule(Installer.answer_run_hook,  _phases(STAGED, INSTALL_INTERRUPTED), ONCE,
                                    (configured, idle, staged_here)),
    ("run_hook", "restart"):   Rule(Installer.answer_run_hook,  _phases(INSTALLED, RESTART_INTERRUPTED), ONCE,
                                    (configured, idle)),
    ("run_hook", "ready"):     Rule(Installer.answer_run_hook,  _phases(RESTARTED),                 PER_ROUND,
                                    (configured, idle)),
    ("discard", None):         Rule(Installer.answer_discard,   ANY_PHASE,                          MANY),
}


def rule_key(message: Message) -> tuple[str, str | None]:
    return message.TYPE, message.hook if isinstance(message, ip.RunHook) else None


def repeated(installer: Installer, message: Message, once: str) -> ip.JobState | None:
    """The current state if this request was already done for the open job
    execution it names (zguide: a retried request is answered, not re-executed)."""
    job = installer.open_job(getattr(message, "job_id", None), getattr(message, "execution", None))
    if job is None or once == MANY:
        return None
    if isinstance(message, ip.OpenJob):
        if not message.release.same_content(job.release):
            raise Refusal(NOT_PERMITTED, f"job {job.job_id} execution {job.execution} is open with another "
                                         "release; a job execution's release never changes")
        done = True
    elif isinstance(message, ip.Stage):
        done = job.stage_begun
    elif once == ONCE:  # install, restart
        done = job.install_begun if message.hook == "install" else job.restart_begun
    else:
        done = job.hook is not None and (job.hook.hook, job.hook.round) == (message.hook, message.round)
    return installer.job_state(message.seq, job.job_id, job.execution) if done else None


def dispatch(installer: Installer, message: Message, peer: bytes | None = None) -> Message:
    """Answer one decoded request, or raise Refusal. The only way in."""
    rule = ALLOW.get(rule_key(message))
    if rule is None:
        raise Refusal(NOT_PERMITTED, f"{message.TYPE} is not in the installer's allow-list")
    if hasattr(message, "job_id"):
        repeat = repeated(installer, message, rule.once)
        if repeat is not None:
            return repeat
        phase = installer.phase_of(message.job_id, message.execution)
        if phase not in rule.phases:
            what = message.TYPE if rule_key(message)[1] is None else f"the {message.hook} hook"
            raise Refusal(NOT_PERMITTED, f"{what} is not permitted for job {message.job_id} execution "
                                         f"{message.execution} in phase {phase}{_why(phase)}")
    for condition in rule.requires:
        refusal = condition(installer, message)
        if refusal is not None:
            raise refusal
    return rule.answer(installer, message)


def _why(phase: str) -> str:
    return {
        NONE: " (open_job first)",
        DISCARDED: " (it was discarded)",
        FAILED: " (it failed; only discard is permitted)",
        STAGING: " (staging runs)",
        INSTALLING: " (the install hook runs)",
        RESTARTING: " (the restart hook runs)",
    }.get(phase, "")
