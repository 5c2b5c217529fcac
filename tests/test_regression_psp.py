"""The engine redesign changed no number: 20 steps of each PSP-lineage trainer give the recorded losses
(tests/regression/psp_runs.py; recorded before the redesign, issue 9 "Done when")."""
import json

import pytest

from tests.regression.psp_runs import RECORD, run_all

pytestmark = pytest.mark.slow
RECORDED = json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_losses_equal_the_recorded_run(name, tmp_path):
    measured = run_all(tmp_path, names={name})[name]
    expected = RECORDED[name]
    assert len(measured) == len(expected)
    for step, (got, want) in enumerate(zip(measured, expected)):
        assert sorted(got) == sorted(want), f"step {step}: logged {sorted(got)}, recorded {sorted(want)}"
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), f"step {step} {key}"
