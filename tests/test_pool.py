"""The driver's bookkeeping without Ray: the feed (resume filter, retries, shape-key
affinity) and the pool's slots (submit, pop, restart, pings) with fake actors."""
from __future__ import annotations

import itertools

from hypersweep.orchestrator.cell import Cell
from hypersweep.orchestrator.feed import Feed, resume_filter
from hypersweep.orchestrator.pool import IN_FLIGHT_PER_ACTOR, Pool


def _cell(seed: int, t: int = 1, problem_params: str = "{}") -> Cell:
    return Cell(study="s", pipeline="sweep_test", problem="toy", algorithm="a",
                backend="jax", t=t, K=None, seed=seed, problem_params=problem_params)


def test_feed_prefers_the_shape_key_an_actor_ran_last():
    a = [_cell(s, problem_params='{"n":1}') for s in range(3)]
    b = [_cell(s, problem_params='{"n":2}') for s in range(3)]
    feed = Feed(iter(a + b), should_run=lambda c: c.seed != 2)
    first, attempt, isolate = feed.take(None)
    assert first == a[0] and attempt == 1 and not isolate
    assert feed.take(b[0].shape_key())[0] == b[0]  # skips a[1] for the affinity
    assert feed.take(a[0].shape_key())[0] == a[1]
    feed.retry.append((a[0], 2, True))
    assert feed.take(b[0].shape_key(), idle=False) is None  # isolated: idle actors only
    assert feed.take(b[0].shape_key()) == (a[0], 2, True)  # retries first
    assert feed.take(None)[0] == b[1]
    assert feed.take(None) is None and feed.empty()
    assert feed.seen == 6 and feed.skipped == 2


def test_feed_resends_before_new_cells_and_the_lookahead_is_bounded():
    source = (_cell(s) for s in range(1000))
    feed = Feed(source, should_run=lambda c: True, lookahead=4)
    assert not feed.empty() and len(feed.window) == 4 and feed.seen == 4
    cell, _, _ = feed.take(None)
    feed.resend(cell, 2, isolate=False)
    feed.resend(_cell(7), 3, isolate=False)
    assert feed.take(None) == (_cell(7), 3, False)  # the last re-sent goes first
    assert feed.take(None) == (cell, 2, False)


def test_resume_filter_skips_ok_and_reruns_failures_only_when_asked():
    previous = {_cell(0).cell_id: "ok", _cell(1).cell_id: "crashed"}
    keep = resume_filter(previous, retry_failed=False)
    assert [keep(_cell(s)) for s in range(3)] == [False, False, True]
    retry = resume_filter(previous, retry_failed=True)
    assert [retry(_cell(s)) for s in range(3)] == [False, True, True]


class _Remote:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def remote(self, *args):
        ref = f"{self.name}-{len(self.log)}"
        self.log.append((self.name, args, ref))
        return ref

    def options(self, **options):  # run_batch's num_returns="streaming"
        self.log.append((self.name, "options", options))
        return self


class _FakeActor:
    """What the pool uses of a Ray actor handle: ``run.remote``,
    ``run_batch.options(...).remote`` and ``ping.remote``."""

    def __init__(self, number: int):
        self.number = number
        self.calls: list = []
        self.run = _Remote(self.calls, f"run{number}")
        self.run_batch = _Remote(self.calls, f"batch{number}")
        self.ping = _Remote(self.calls, f"ping{number}")


def _pool(size: int) -> Pool:
    counter = itertools.count()
    pool = Pool(lambda: _FakeActor(next(counter)))
    pool.start(size)
    return pool


def test_pool_start_pings_every_actor_and_slots_wait_for_it():
    pool = _pool(3)
    assert [slot.actor.number for slot in pool.slots] == [0, 1, 2]
    assert len(pool.pings) == 3 and not any(slot.ready for slot in pool.slots)
    assert {pool.pings[slot.ping] for slot in pool.slots} == set(pool.slots)
    assert not any(slot.wants_more() for slot in pool.slots)
    pool.slots[0].ready = True
    assert pool.slots[0].wants_more()


def test_pool_submit_pop_and_the_in_flight_limit():
    pool = _pool(1)
    slot = pool.slots[0]
    slot.ready = True
    cells = [_cell(s, problem_params='{"n":3}') for s in range(IN_FLIGHT_PER_ACTOR)]
    tasks = [pool.submit(slot, cell, 1, isolate=False) for cell in cells]
    assert not slot.wants_more() and list(slot.queue) == tasks
    assert slot.last_key == cells[-1].shape_key()
    assert set(pool.refs()) == {t.ref for t in tasks} | set(pool.pings)
    assert pool.finished({tasks[1].ref}) == [(slot, tasks[1])]
    assert pool.running() == [slot]
    pool.pop(slot, tasks[0])
    assert list(slot.queue) == tasks[1:] and tasks[0].ref not in pool.by_ref
    assert slot.wants_more()


def test_an_isolated_cell_runs_alone_and_a_restart_forgets_the_queue():
    pool = _pool(1)
    slot = pool.slots[0]
    slot.ready = True
    task = pool.submit(slot, _cell(0), 2, isolate=True)
    assert slot.isolated and not slot.wants_more()
    pool.restart(slot, kill=False)  # a crash: Ray restarts the actor by itself
    assert not slot.queue and task.ref not in pool.by_ref and not slot.isolated
    assert not slot.ready and slot.ping in pool.pings  # waits for a new ping
    assert slot.actor.calls[-1][0] == "ping0"


def test_ping_due_re_pings_only_restarting_actors_whose_time_has_come():
    pool = _pool(2)
    first, second = pool.slots
    pool.pings.clear()
    first.ping_at, second.ping_at = 10.0, 20.0
    pool.ping_due(15.0)
    assert first.ping_at is None and first.ping in pool.pings
    assert second.ping_at == 20.0 and second.ping not in pool.pings


def test_a_batch_is_one_streaming_task_whose_rows_restart_the_clock():
    pool = _pool(1)
    slot = pool.slots[0]
    slot.ready = True
    cells = [_cell(s, problem_params='{"n":4}') for s in range(3)]
    task = pool.submit_batch(slot, cells, [1, 1, 1])
    name, options, kwargs = slot.actor.calls[-2]
    assert (name, options, kwargs) == ("batch0", "options", {"num_returns": "streaming"})
    assert slot.actor.calls[-1][1] == (cells, [1, 1, 1])
    assert task.batched and task.cells == tuple(cells) and pool.by_ref[task.ref] is task
    assert list(task.pending) == [c.cell_id for c in cells]
    assert slot.last_key == cells[0].shape_key() and slot.wants_more()  # one task queued
    slot.head_since = 0.0
    assert pool.received(slot, task, cells[1].cell_id) and slot.head_since > 0
    assert not pool.received(slot, task, cells[1].cell_id)  # a duplicate: ignored
    assert list(task.pending) == [cells[0].cell_id, cells[2].cell_id]
    alone = pool.submit_batch(slot, cells[:1], [2])  # one cell: a plain run task
    assert not alone.batched and slot.actor.calls[-1][0] == "run0"
    assert alone.cell == cells[0] and alone.attempt == 2 and not slot.wants_more()
