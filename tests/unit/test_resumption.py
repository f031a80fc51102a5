import json

from fullscale import resumption


def write(run_dir, records):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut by a ki')


def events(run_dir):
    return [(r["event"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


RECORDS = [{"event": "eval", "step": 0}, {"event": "train", "step": 1}, {"event": "train", "step": 2},
           {"event": "eval", "step": 2}, {"event": "train", "step": 3}, {"event": "health", "step": 3},
           {"event": "train_end", "step": 3}]


def test_records_after_the_checkpoint_are_dropped_and_the_redone_span_returned(tmp_path):
    write(tmp_path, RECORDS)
    assert resumption.truncate_metrics(tmp_path, 2) == 3
    assert events(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]


def test_kept_events_survive_and_a_pending_evaluation_is_dropped_to_be_redone(tmp_path):
    write(tmp_path, RECORDS)
    resumption.truncate_metrics(tmp_path, 2, keep_events=("health",), eval_redone=True)
    assert events(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("health", 3)]
