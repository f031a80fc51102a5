"""TrainState: what a checkpoint saves of the loop is one state_dict(), restored in place."""

import json

from fullscale.run import TrainState


def test_state_dict_round_trips_through_json_in_place():
    state = TrainState(step=7, epoch=1, micro_in_epoch=4, tokens_seen=900, pending_losses=[1.5, float("nan")],
                       pending_tokens=33, pending_eval_losses=[1.5], eval_pending=True)
    saved = json.loads(json.dumps({"train_state": state.state_dict()}))["train_state"]
    target = TrainState()
    held = target   # fit() and the Run hold the same object
    target.load_state_dict(saved)
    assert held is target and target.step == 7 and target.micro_in_epoch == 4 and target.eval_pending
    assert target.pending_tokens == 33 and target.pending_eval_losses == [1.5]
    assert target.pending_losses[0] == 1.5 and target.pending_losses[1] != target.pending_losses[1]   # NaN kept


def test_the_restored_windows_are_copies_and_missing_keys_keep_their_defaults():
    saved = {"step": 3, "pending_losses": [2.0]}
    state = TrainState(num_resumes=5, pending_eval_losses=[9.0])
    state.load_state_dict(saved)
    state.pending_losses.append(1.0)
    assert saved["pending_losses"] == [2.0]                      # the loop appends to its own list
    assert state.num_resumes == 0 and state.pending_eval_losses == []   # what the checkpoint lacks: defaults
