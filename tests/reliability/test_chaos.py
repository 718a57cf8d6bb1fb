"""The seeded chaos run of the normal suite (CI): UPPARAT_CHAOS_TRIALS trials
(default 30) of tests/reliability/chaos.py with seed UPPARAT_CHAOS_SEED
(default 2026). Every trial must keep every rule; a failing trial names the
command that runs it again on its own. The large run: docs/reliability.md."""

import json
import os

import pytest

from tests.reliability.chaos import FAULTS, MOMENTS, run_trials, summary

TRIALS = int(os.environ.get("UPPARAT_CHAOS_TRIALS", "30"))
SEED = int(os.environ.get("UPPARAT_CHAOS_SEED", "2026"))
pytestmark = pytest.mark.timeout(300 + TRIALS * 60)


def test_seeded_chaos_trials_keep_every_rule(world_tmp):
    results = run_trials(TRIALS, SEED, workdir=world_tmp, progress=None)
    figures = summary(results)
    print("\nchaos figures: " + json.dumps(figures))
    assert len(results) == TRIALS
    bad = [t for t in results if t.violations]
    assert not bad, "\n".join(
        f"trial {t.index} ({t.fault} at {t.moment}, phase {t.phase_at_fault}): {'; '.join(t.violations)}\n"
        f"  again: .venv/bin/python -m tests.reliability.chaos --seed {SEED} --only {t.index} --keep -v"
        for t in bad)
    # the faults were really injected, at every moment, and the jobs really ran
    if TRIALS >= len(FAULTS):
        assert set(figures["by_fault"]) == set(FAULTS)
    if TRIALS >= len(MOMENTS):
        assert set(figures["by_moment"]) == set(MOMENTS)
    assert all(t.effect for t in results)
    assert all(t.install_runs >= 1 for t in results if t.status == "SUCCEEDED")
