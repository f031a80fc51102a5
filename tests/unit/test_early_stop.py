from fullscale.early_stop import EarlyStopping


def test_stops_after_exactly_patience_evaluations_without_improvement():
    es = EarlyStopping(patience=3, min_delta=0.01)
    assert es.update(2.0, 0)
    assert es.update(1.5, 10)
    for i, loss in enumerate([1.6, 1.5, 1.495], start=1):  # 1.495 is not better by > min_delta
        assert not es.update(loss, 10 + 10 * i)
        assert es.should_stop == (i == 3)
    assert es.best == 1.5 and es.best_step == 10


def test_an_improvement_larger_than_min_delta_resets_the_counter():
    es = EarlyStopping(patience=2, min_delta=0.1)
    es.update(1.0, 0)
    es.update(0.95, 1)            # within min_delta: not an improvement
    assert es.num_bad_evals == 1
    assert es.update(0.85, 2)     # better by 0.15
    assert es.num_bad_evals == 0 and not es.should_stop


def test_patience_zero_never_stops_but_tracks_the_best():
    es = EarlyStopping(patience=0, min_delta=0.0)
    for step, loss in enumerate([1.0, 2.0, 3.0, 4.0]):
        es.update(loss, step)
    assert not es.should_stop and es.best_step == 0


def test_nan_is_never_a_best():
    es = EarlyStopping(patience=2, min_delta=0.0)
    assert not es.update(float("nan"), 0)
    assert es.best is None


def test_state_dict_round_trip_keeps_the_counter():
    es = EarlyStopping(patience=3, min_delta=0.0)
    es.update(1.0, 0)
    es.update(1.1, 1)
    other = EarlyStopping(patience=3, min_delta=0.0)
    other.load_state_dict(es.state_dict())
    assert other.update(1.2, 2) is False
    assert other.num_bad_evals == 2 and other.best_step == 0
