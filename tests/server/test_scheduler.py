"""The scheduler's policy: one adaptation per batch, grouping, scoring first, bounded waits, bounded queue."""

import threading
import time

import pytest

from experts.mix import BASE, Adaptation
from server.errors import Overloaded
from server.engines.scheduler import GENERATE, SCORE, Job, Scheduler

A, B = Adaptation.of({"a": 1}), Adaptation.of({"b": 1})


def job(adaptation, kind=GENERATE, t=None):
    j = Job(kind, adaptation, payload=None)
    if t is not None:
        j.enqueued = t
    return j


def test_batches_hold_one_adaptation_and_group_requests():
    s = Scheduler(max_batch=8, max_wait_s=10)
    for a in (A, B, A, B, A):
        s.submit(job(a))
    first = s.next_batch(0)
    assert first.adaptation == A and len(first.jobs) == 3          # the oldest group, all of it
    second = s.next_batch(0)
    assert second.adaptation == B and len(second.jobs) == 2
    assert s.next_batch(0) is None
    assert s.swaps == 2                                            # base → A → B


def test_current_adaptation_keeps_the_weights_until_someone_waits_too_long():
    s = Scheduler(max_batch=1, max_wait_s=0.2)
    now = time.monotonic()
    s.submit(job(A, t=now - 0.05))
    s.submit(job(B, t=now - 0.04))
    s.submit(job(A, t=now))
    assert s.next_batch(0).adaptation == A
    assert s.next_batch(0).adaptation == A      # B waited < max_wait: no swap, A goes on
    assert s.next_batch(0).adaptation == B


def test_a_waiting_group_is_served_after_max_wait_even_under_constant_traffic():
    s = Scheduler(max_batch=1, max_wait_s=0.05)
    s.submit(job(A))
    assert s.next_batch(0).adaptation == A
    s.submit(job(B))
    served = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        s.submit(job(A))                          # A never runs dry
        b = s.next_batch(0)
        served.append(b.adaptation)
        if b.adaptation == B:
            break
        time.sleep(0.01)
    assert served[-1] == B and len(served) < 20


def test_scoring_jobs_go_before_generation_under_the_same_weights():
    s = Scheduler(max_batch=8, max_wait_s=10)
    s.submit(job(BASE, GENERATE))
    s.submit(job(BASE, SCORE))
    b = s.next_batch(0)
    assert (b.adaptation, b.kind, len(b.jobs)) == (BASE, SCORE, 1)
    assert s.next_batch(0).kind == GENERATE


def test_queue_is_bounded_and_cancelled_jobs_are_dropped():
    s = Scheduler(max_batch=8, max_wait_s=10, max_queue=2)
    j1, j2 = job(A), job(B)
    s.submit(j1)
    s.submit(j2)
    with pytest.raises(Overloaded):
        s.submit(job(A))
    j1.cancelled = True
    b = s.next_batch(0)
    assert b.jobs == [j2]


def test_next_batch_blocks_until_work_arrives_and_close_wakes_it():
    s = Scheduler()
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_batch(5)))
    t.start()
    time.sleep(0.05)
    s.submit(job(A))
    t.join(2)
    assert got and got[0].adaptation == A
    t = threading.Thread(target=lambda: got.append(s.next_batch(None)))
    t.start()
    left = s.close()
    t.join(2)
    assert not t.is_alive() and got[-1] is None and left == []
    with pytest.raises(Overloaded):
        s.submit(job(A))
