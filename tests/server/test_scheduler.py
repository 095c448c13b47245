"""The scheduler's policy: FIFO per kind, admission by slot, refused jobs don't block, the starvation guard,
bounded queue, removal (unload), wait/wake/close."""

import threading
import time

import pytest

from experts.mix import BASE, Adaptation
from server.errors import Overloaded
from server.engines.scheduler import Job, JobKind, Scheduler

A, B, C = Adaptation.of({"a": 1}), Adaptation.of({"b": 1}), Adaptation.of({"c": 1})
GENERATE, SCORE = JobKind.GENERATE, JobKind.SCORE


def job(adaptation, kind=GENERATE, t=None):
    j = Job(kind, adaptation, payload=None)
    if t is not None:
        j.enqueued = t
    return j


def yes(_job):
    return True


def test_a_batch_takes_any_adaptations_oldest_first():
    s = Scheduler(max_batch=8, max_wait_s=10)
    jobs = [job(a) for a in (A, B, A, BASE, C)]
    for j in jobs:
        s.submit(j)
    assert s.take(GENERATE, 3, yes) == jobs[:3]          # mixed, in arrival order, at most `limit`
    assert s.take(GENERATE, 8, yes) == jobs[3:]
    assert s.take(GENERATE, 8, yes) == [] and s.waiting() == 0


def test_a_job_without_a_slot_waits_and_does_not_block_the_others():
    s = Scheduler(max_batch=8, max_wait_s=10)
    a1, b1, a2 = job(A), job(B), job(A)
    for j in (a1, b1, a2):
        s.submit(j)
    got = s.take(GENERATE, 8, lambda j: j.adaptation != B)   # B has no slot now
    assert got == [a1, a2] and s.waiting() == 1
    assert s.take(GENERATE, 8, yes) == [b1]                  # its slot came free: it goes


def test_starvation_guard_an_overdue_job_stops_younger_ones_until_it_gets_a_slot():
    """One slot, held by running A rows; A requests keep coming, each runs two steps. The B request has no
    slot. Once it has waited max_wait_s, nothing younger is admitted, so the A rows drain and B gets the
    slot. (Delete the guard in Scheduler.take and this fails: a new A row always holds the slot.)"""
    s = Scheduler(max_batch=8, max_wait_s=0.05)
    running = [(A.key, 2)]                               # (adaptation key, steps left) of the running rows
    b = job(B, t=time.monotonic() - 1)                   # it has waited longer than max_wait_s
    s.submit(b)
    admitted: set[str] = set()

    def admit(j):                                        # the engine's rule: a slot per live adaptation
        live = {k for k, _ in running} | admitted
        if j.adaptation.key in live or not live:
            admitted.add(j.adaptation.key)
            return True
        return False

    for _ in range(20):
        s.submit(job(A))                                 # A never runs dry
        admitted.clear()
        new = s.take(GENERATE, 8, admit)
        if b in new:
            break
        running = [(k, n - 1) for k, n in running if n > 1] + [(j.adaptation.key, 2) for j in new]
    else:
        pytest.fail("the request of the slotless adaptation starved")
    assert all(k == A.key for k, _ in running) and s.waiting() >= 1   # the A requests wait behind it


def test_a_refused_job_that_is_not_overdue_lets_younger_jobs_pass():
    s = Scheduler(max_batch=8, max_wait_s=10)
    b, a = job(B), job(A)
    s.submit(b)
    s.submit(a)
    assert s.take(GENERATE, 8, lambda j: j.adaptation == A) == [a]


def test_scoring_and_generation_are_separate_queues():
    s = Scheduler(max_batch=8, max_wait_s=10)
    g, sc = job(BASE, GENERATE), job(BASE, SCORE)
    s.submit(g)
    s.submit(sc)
    assert s.take(SCORE, 8, yes) == [sc]
    assert s.take(GENERATE, 8, yes) == [g]


def test_queue_is_bounded_cancelled_jobs_are_dropped_and_remove_takes_out():
    s = Scheduler(max_batch=8, max_wait_s=10, max_queue=3)
    j1, j2, j3 = job(A), job(B), job(C)
    for j in (j1, j2, j3):
        s.submit(j)
    with pytest.raises(Overloaded):
        s.submit(job(A))
    j1.cancelled = True
    assert s.remove(lambda j: j.adaptation == C) == [j3]
    assert s.take(GENERATE, 8, yes) == [j2]


def test_wait_blocks_until_work_arrives_and_close_wakes_it():
    s = Scheduler()
    got = []
    t = threading.Thread(target=lambda: got.append(s.wait(5)))
    t.start()
    time.sleep(0.05)
    s.submit(job(A))
    t.join(2)
    assert got == [True]
    s.take(GENERATE, 8, yes)
    t = threading.Thread(target=lambda: got.append(s.wait(None)))
    t.start()
    left = s.close()
    t.join(2)
    assert not t.is_alive() and got[-1] is False and left == []
    with pytest.raises(Overloaded):
        s.submit(job(A))
