from fullscale import sampler


def _steps(n, *, per_device, world, accum, epoch=0):
    """The set of examples in each optimizer step, all ranks together."""
    batches = sampler.global_micro_batches(n, seed=3, epoch=epoch, global_batch_size=per_device * world,
                                           num_processes=world)
    steps = []
    for i in range(0, len(batches), accum):
        ids = []
        for b in batches[i:i + accum]:
            for r in range(world):
                ids += sampler.rank_slice(b, rank=r, num_processes=world)
        steps.append(sorted(ids))
    return steps


def test_one_process_and_two_processes_see_the_same_examples_per_step():
    assert _steps(100, per_device=8, world=1, accum=2) == _steps(100, per_device=4, world=2, accum=2)


def test_accumulation_split_does_not_change_the_examples_per_step():
    assert _steps(64, per_device=2, world=1, accum=4) == _steps(64, per_device=8, world=1, accum=1)


def test_order_depends_on_seed_and_epoch_only():
    a = sampler.epoch_order(50, seed=1, epoch=0)
    assert a == sampler.epoch_order(50, seed=1, epoch=0)
    assert a != sampler.epoch_order(50, seed=1, epoch=1)
    assert sorted(a) == list(range(50))


def test_rank_slices_cover_a_partial_batch_exactly():
    batch = list(range(7))
    parts = [sampler.rank_slice(batch, rank=r, num_processes=3) for r in range(3)]
    assert sum(parts, []) == batch and all(parts)


def test_a_last_batch_too_small_for_every_rank_is_dropped():
    assert sampler.micro_batches_per_epoch(9, global_batch_size=8, num_processes=2) == 1
    assert sampler.micro_batches_per_epoch(10, global_batch_size=8, num_processes=2) == 2
    assert sampler.steps_per_epoch(10, global_batch_size=8, num_processes=2, accumulation=4) == 1


def test_group_by_length_keeps_the_epoch_and_cuts_padding():
    import random

    rnd = random.Random(0)
    lengths = [int(20 * 10 ** rnd.random()) for _ in range(1000)]   # log-uniform 20-200, like instruction data
    kw = dict(num_examples=1000, seed=3, epoch=1, global_batch_size=8, num_processes=2)
    plain = sampler.global_micro_batches(**kw)
    grouped = sampler.global_micro_batches(**kw, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert [len(b) for b in grouped] == [len(b) for b in plain]
    assert grouped == sampler.global_micro_batches(**kw, lengths=lengths)         # deterministic (exact resume)
    assert grouped != sampler.global_micro_batches(**{**kw, "epoch": 2}, lengths=lengths)
    assert sampler.padding_share(grouped, lengths) < 0.1 < 0.3 < sampler.padding_share(plain, lengths)
    # Still shuffled: consecutive micro-batches are not in length order across the epoch.
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)
