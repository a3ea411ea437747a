"""The row loader: deterministic for a seed, sharded by host, resumable from its state."""

import itertools
import json

import pytest

from g2e.data.loader import Loader

N = 23


def _take(loader, k):
    return list(itertools.islice(loader, k))


def test_order_is_a_function_of_the_seed_and_epoch():
    first = list(Loader(range(N), seed=5, num_epochs=2, process_index=0, process_count=1))
    again = list(Loader(range(N), seed=5, num_epochs=2, process_index=0, process_count=1))
    other = list(Loader(range(N), seed=6, num_epochs=2, process_index=0, process_count=1))
    assert first == again and first != other
    assert sorted(first[:N]) == sorted(first[N:]) == list(range(N))
    assert first[:N] != first[N:]  # each epoch has its own order
    assert list(Loader(range(N), shuffle=False, process_index=0, process_count=1)) == list(range(N))


def test_two_hosts_see_every_row_once():
    hosts = [list(Loader(range(N), seed=1, process_index=i, process_count=2)) for i in (0, 1)]
    assert sorted(hosts[0] + hosts[1]) == list(range(N))
    assert len(hosts[0]) == 12 and len(hosts[1]) == 11
    assert [len(Loader(range(N), process_index=i, process_count=2)) for i in (0, 1)] == [12, 11]


def test_drop_remainder_keeps_hosts_in_lockstep():
    hosts = [
        list(Loader(range(N), seed=1, process_index=i, process_count=3, drop_remainder=True))
        for i in range(3)
    ]
    assert [len(h) for h in hosts] == [7, 7, 7]
    assert len(set(hosts[0] + hosts[1] + hosts[2])) == 21


def test_resume_mid_epoch_gives_exactly_the_remaining_rows():
    rows = [f"row{i}" for i in range(N)]
    full = list(Loader(rows, seed=9, num_epochs=2, process_index=0, process_count=1))
    loader = Loader(rows, seed=9, num_epochs=2, process_index=0, process_count=1)
    head = _take(loader, 8)
    state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
    _take(loader, 5)  # progress after the save is lost with the crash
    restored = Loader(rows, seed=9, num_epochs=2, process_index=0, process_count=1)
    restored.set_state(state)
    assert head + list(restored) == full


def test_resume_two_hosts_and_on_a_different_host_count():
    epoch = Loader(range(N), seed=2, process_index=0, process_count=1, drop_remainder=True)
    order = list(epoch)
    hosts = [
        Loader(range(N), seed=2, process_index=i, process_count=2, drop_remainder=True)
        for i in (0, 1)
    ]
    seen = [x for _ in range(4) for h in hosts for x in _take(h, 1)]
    states = [h.get_state() for h in hosts]
    assert states[0] == states[1] and states[0]["position"] == 8
    for count in (2, 3):  # same hosts, or three hosts after a resize
        rest = []
        for i in range(count):
            h = Loader(range(N), seed=2, process_index=i, process_count=count, drop_remainder=False)
            h.set_state(states[0])
            rest += list(h)
        assert sorted(seen + rest) == sorted(order)
        assert sorted(rest) == sorted(order[8:])


def test_repeat_forever_crosses_epochs():
    loader = Loader(range(5), seed=0, num_epochs=None, process_index=1, process_count=2)
    taken = _take(loader, 7)  # host 1 takes 2 per epoch
    assert len(taken) == 7 and loader.get_state()["epoch"] == 3


def test_state_from_other_data_or_seed_is_refused():
    state = Loader(range(N), seed=1, process_index=0, process_count=1).get_state()
    with pytest.raises(ValueError, match="num_records"):
        Loader(range(N + 1), seed=1, process_index=0, process_count=1).set_state(state)
    with pytest.raises(ValueError, match="seed"):
        Loader(range(N), seed=2, process_index=0, process_count=1).set_state(state)


def test_too_few_rows_for_the_hosts_is_an_error_not_a_hang():
    loader = Loader(range(1), num_epochs=None, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="too few for 2 hosts"):
        next(loader)
    with pytest.raises(ValueError, match="process_index"):
        Loader(range(3), process_index=2, process_count=2)
