"""The stop reasons of one step meet in one rule (fullscale.loop.stronger)."""

from fullscale.loop import STOP_PRECEDENCE, stronger


def test_a_later_decision_never_replaces_a_stronger_one():
    assert stronger(None, None) is None
    assert stronger(None, "epochs") == "epochs" and stronger("epochs", None) == "epochs"
    assert stronger("max_steps", "preempted") == "preempted"          # the end's evaluation waits for the resume
    assert stronger("health_abort", "preempted") == "health_abort"    # an abort is never turned into a resume
    assert stronger("max_steps", "early_stopping") == "max_steps"     # the end of the schedule at the same step
    assert stronger("early_stopping", "health_abort") == "health_abort"
    for i, strong in enumerate(STOP_PRECEDENCE):
        for weak in STOP_PRECEDENCE[i:]:
            assert stronger(strong, weak) == strong == stronger(weak, strong)
