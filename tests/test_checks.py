"""The PASS/FAIL logic of the reproduction checks, on synthetic numbers."""

import math

import pytest

from icl_gd.experiments.checks import Check, all_passed


@pytest.mark.parametrize("check,ok", [
    (Check("eta", 0.765, 0.7692, 0.03), True),
    (Check("eta", 0.70, 0.7692, 0.03), False),
    (Check("eta", 0.80, 0.7692, 0.03), False),
    (Check("loss", 1.16, 1.1538, 0.01), True),
    (Check("loss", 1.18, 1.1538, 0.01), False),
    (Check("rel_error", 0.02, 0.05, 0.0, "max"), True),
    (Check("rel_error", 0.06, 0.05, 0.0, "max"), False),
    (Check("gain", 0.3, 0.5, 0.0, "min"), False),
    (Check("gain", 0.6, 0.5, 0.0, "min"), True),
    (Check("offset", 0.01, 0.0, 0.02, "abs"), True),
    (Check("offset", -0.03, 0.0, 0.02, "abs"), False),
    (Check("eta", math.nan, 0.7692, 0.03), False),
    (Check("rel_error", math.inf, 0.05, 0.0, "max"), False),
])
def test_checks_pass_and_fail_as_stated(check, ok):
    assert check.passed is ok
    assert check.line().startswith("PASS" if ok else "FAIL")
    assert check.to_dict()["passed"] is ok


def test_all_passed_needs_every_check_and_at_least_one():
    good, bad = Check("a", 1.0, 1.0, 0.0), Check("b", 2.0, 1.0, 0.1)
    assert all_passed([good]) and not all_passed([good, bad]) and not all_passed([])
    with pytest.raises(ValueError):
        Check("c", 1.0, 1.0, -0.1)
    with pytest.raises(ValueError):
        Check("c", 1.0, 1.0, 0.1, "around")


def test_train_seconds_shares_a_group_call_among_its_members():
    from icl_gd.experiments.base import train_seconds

    single = [{"step": 100, "steps_per_sec": 50.0}, {"step": 300, "steps_per_sec": 100.0}]
    assert train_seconds(single) == 4.0  # 100 / 50 + 200 / 100
    grouped = [dict(r, group_size=4) for r in single]
    assert train_seconds(grouped) == 1.0


def test_a_judged_experiment_without_checks_does_not_pass():
    from icl_gd.experiments.base import Outcome

    assert not Outcome("x", "claim", [], [], "fig.png", reported_only=False).passed
    assert Outcome("x", "claim", [], [], "fig.png", reported_only=True).passed
    assert Outcome("x", "claim", [Check("c", 1.0, 1.0, 0.01)], [], "fig.png", reported_only=False).passed
