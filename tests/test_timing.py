"""StageTimer: wall time per stage, added up over repeated stages, kept when a stage fails."""

from __future__ import annotations

import time

import pytest

from idgen.utils.timing import StageTimer


def test_stages_are_timed_returned_and_added_up():
    timer = StageTimer()
    assert timer.run("sleep", time.sleep, 0.12) is None
    assert timer.run("add", lambda a, b: a + b, 2, 3) == 5
    timer.run("sleep", time.sleep, 0.12)
    assert timer.seconds["sleep"] >= 0.2  # two sleeps of >= 0.12 s each, rounded to 0.1 s
    assert timer.seconds["add"] == 0.0
    assert list(timer.seconds) == ["sleep", "add"]  # in the order the stages first ran


def test_a_failing_stage_is_still_timed():
    timer = StageTimer()

    def fail():
        time.sleep(0.15)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        timer.run("fails", fail)
    assert timer.seconds["fails"] >= 0.1
