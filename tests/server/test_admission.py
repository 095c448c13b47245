"""The asynchronous admission gate (server/engines/admission.py, used by the vLLM engine): the same policy as the
Scheduler, read for requests. Real gate, real event loop; the swap is a coroutine that records what it saw."""

import asyncio
import random
import time

import pytest

from experts.mix import BASE, Adaptation
from server.errors import Overloaded
from server.engines.admission import AdmissionGate

A, B, C = Adaptation.of({"a": 1}), Adaptation.of({"b": 1}), Adaptation.of({"c": 1})


class Weights:
    """What an engine does on a swap: checks nothing runs, takes a while, changes the weights."""

    def __init__(self, delay=0.01):
        self.delay, self.now, self.log, self.gate = delay, BASE, [], None

    async def swap(self, a):
        assert self.gate.running == 0, "swap under admitted requests"
        await asyncio.sleep(self.delay)
        self.now = a
        self.log.append(a)
        return f"swapped to {a.key}"


def gate_with(delay=0.01, **kw):
    w = Weights(delay)
    w.gate = AdmissionGate(w.swap, **kw)
    return w.gate, w


def test_admitted_requests_always_run_under_their_own_weights():
    async def main():
        gate, w = gate_with(max_wait_s=0.02)
        rng = random.Random(0)
        seen = []

        async def request(a, t0):
            await asyncio.sleep(t0)
            async with gate.admitted(a) as adm:
                for _ in range(3):             # a few "decode steps"; the weights must not move under us
                    assert w.now == a
                    seen.append(a)
                    await asyncio.sleep(rng.random() * 0.005)
                return adm

        adms = await asyncio.gather(*(request(rng.choice([BASE, A, B, C]), rng.random() * 0.2) for _ in range(200)))
        return gate, w, adms, seen

    gate, w, adms, seen = asyncio.run(main())
    assert len(seen) == 600 and gate.running == 0 and gate.waiting() == 0
    assert 3 <= len(w.log) < 200                          # grouped: far fewer swaps than requests
    assert all(a.admitted >= a.enqueued for a in adms)
    assert {a.swap for a in adms if a.swap} <= {f"swapped to {x.key}" for x in (BASE, A, B, C)}


def test_requests_arriving_during_a_swap_queue_and_get_in_after_it():
    async def main():
        gate, w = gate_with(delay=0.1)
        first = asyncio.create_task(gate.acquire(A))          # starts the swap
        await asyncio.sleep(0.02)
        late = [asyncio.create_task(gate.acquire(A)) for _ in range(3)]
        await asyncio.sleep(0)
        assert gate.waiting() == 4 and not any(t.done() for t in late)
        got = await asyncio.gather(first, *late)
        return gate, w, got

    gate, w, got = asyncio.run(main())
    assert w.log == [A] and gate.running == 4
    assert all(g.swap == "swapped to a" for g in got)      # they all came in with that one swap


def test_the_current_adaptation_keeps_the_weights_until_another_waits_too_long():
    async def main():
        gate, w = gate_with(max_wait_s=0.15)
        a1 = await gate.acquire(A)
        b = asyncio.create_task(gate.acquire(B))
        await asyncio.sleep(0.01)
        a2 = await asyncio.wait_for(gate.acquire(A), 1)     # B has waited < max_wait: A still gets in
        await asyncio.sleep(0.2)
        a3 = asyncio.create_task(gate.acquire(A))           # B has waited too long: A must queue now
        await asyncio.sleep(0.01)
        assert not a3.done() and not b.done()
        gate.release(a1)
        gate.release(a2)                                    # A drained → swap to B (the oldest), then A again
        got_b = await asyncio.wait_for(b, 1)
        assert w.now == B and not a3.done()
        gate.release(got_b)
        await asyncio.wait_for(a3, 1)
        return w

    assert asyncio.run(main()).log == [A, B, A]


def test_constant_traffic_of_one_adaptation_cannot_starve_another():
    async def main():
        gate, w = gate_with(max_wait_s=0.05)
        stop = asyncio.Event()

        async def flood():
            while not stop.is_set():
                async with gate.admitted(A):
                    await asyncio.sleep(0.01)

        floods = [asyncio.create_task(flood()) for _ in range(4)]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        adm = await asyncio.wait_for(gate.acquire(B), 2)
        waited = time.perf_counter() - t0
        gate.release(adm)
        stop.set()
        await asyncio.gather(*floods)
        return waited

    assert asyncio.run(main()) < 0.5


def test_full_queue_is_overloaded_and_cancelled_waiters_leave():
    async def main():
        gate, w = gate_with(max_queue=2)
        held = await gate.acquire(BASE)                     # base holds the weights: A and B must wait
        t1 = asyncio.create_task(gate.acquire(A))
        t2 = asyncio.create_task(gate.acquire(B))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await gate.acquire(C)
        t1.cancel()
        await asyncio.gather(t1, return_exceptions=True)
        assert gate.waiting() == 1
        gate.release(held)
        got = await asyncio.wait_for(t2, 1)
        return gate, w, got

    gate, w, got = asyncio.run(main())
    assert w.log == [B] and got.adaptation == B and gate.running == 1


def test_a_failed_swap_fails_its_group_only_and_the_next_swap_rewrites():
    async def main():
        calls = []

        async def swap(a):
            calls.append(a)
            if a == A:
                raise RuntimeError("device fault")
            return "ok"

        gate = AdmissionGate(swap)
        with pytest.raises(RuntimeError, match="device fault"):
            await gate.acquire(A)
        assert gate.current is None
        adm = await asyncio.wait_for(gate.acquire(BASE), 1)  # unknown weights: even base is rewritten
        gate.release(adm)
        return calls

    assert asyncio.run(main()) == [A, BASE]


def test_close_fails_waiters_and_refuses_new_requests():
    async def main():
        gate, _ = gate_with()
        held = await gate.acquire(BASE)
        waiter = asyncio.create_task(gate.acquire(A))
        await asyncio.sleep(0.01)
        gate.close(Overloaded("shutting down"))
        with pytest.raises(Overloaded):
            await waiter
        with pytest.raises(Overloaded):
            await gate.acquire(BASE)
        gate.release(held)

    asyncio.run(main())
