"""The short fault-injection run of the default suite: a random-moment kill, a kill inside a save, and a kill
inside a universal conversion; every run must resume from a complete checkpoint and end as if never interrupted.
The long version: python bench/fault_injection.py --trials 20"""

from __future__ import annotations

import pytest

from tests.fault_trials import run_trials

pytestmark = [pytest.mark.slow, pytest.mark.long]  # three killed-and-resumed 2-rank runs: make test-all


def test_kills_at_any_moment_never_leave_an_unresumable_or_different_run(tmp_path, tiny_model, full_reference):
    reference = {1: full_reference(1), 2: full_reference(2)}
    tally = run_trials(["random", "during-save", "conversion"], tmp_path, tiny_model, seed=1, reference=reference)
    assert tally.kills == 3  # one per kind of moment (a random draw after the run ended is drawn again)
    assert tally.kills_during_save >= 1 and tally.kills_during_conversion == 1
    assert tally.unresumable == 0 and tally.mismatches == 0, tally.notes
