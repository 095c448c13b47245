"""The vLLM engine's admission (server/engines/admission.py): a bound on the requests inside, counted per
adaptation key, and the drain an expert's unload waits on. Pure asyncio, no engine."""

import asyncio

import pytest

from server.engines.admission import InFlight
from server.errors import EngineUnavailable, Overloaded


def test_the_bound_is_a_429_and_a_freed_place_admits_again():
    f = InFlight(2)
    with f.admitted("math"), f.admitted("base"):
        assert f.total == 2 and dict(f.running) == {"math": 1, "base": 1}
        with pytest.raises(Overloaded):
            with f.admitted("code"):
                pass
    with f.admitted("code"):
        assert f.total == 1
    assert f.total == 0 and not f.running


def test_drain_waits_for_the_keys_asked_and_only_those():
    async def main():
        f = InFlight(10)
        release = asyncio.Event()

        async def request(key):
            with f.admitted(key):
                await release.wait()

        tasks = [asyncio.create_task(request(k)) for k in ("code+math", "math", "base")]
        await asyncio.sleep(0)
        drain = asyncio.create_task(f.drain(lambda k: "math" in k.split("+"), timeout_s=30))
        await asyncio.sleep(0.05)
        assert not drain.done()                        # two requests of math's keys are still inside
        left = await f.drain(lambda k: k == "base", timeout_s=0.05)
        assert left == ["base"]                       # bounded: returns what is left at the deadline
        release.set()
        assert await drain == []
        await asyncio.gather(*tasks)
        f.close(EngineUnavailable("shutting down"))
        with pytest.raises(EngineUnavailable):
            with f.admitted("base"):
                pass

    asyncio.run(main())
