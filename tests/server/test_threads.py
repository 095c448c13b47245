"""All of the embedded engine's torch work runs in one thread (one OpenMP pool on a CPU: see
server/engines/factory.py `in_own_thread`), and startup model work in a thread that ends."""

import asyncio
import threading

import pytest

from server.engines.factory import StartupError, in_own_thread
from server.engines.hf import HFEngine


def test_in_own_thread_returns_raises_and_leaves_no_thread():
    names = []
    assert in_own_thread(lambda: names.append(threading.current_thread().name) or 7) == 7
    assert names == ["t2-startup"] and names[0] != threading.current_thread().name
    with pytest.raises(StartupError, match="bad folder"):
        in_own_thread(lambda: (_ for _ in ()).throw(StartupError("bad folder")))
    assert not any(t.name == "t2-startup" for t in threading.enumerate())


def test_the_engine_loads_in_the_thread_that_runs_its_steps(tiny_model_dir, tmp_path):
    eng = HFEngine(tiny_model_dir, cache_dir=tmp_path / "cache")
    where = []
    load = eng.load
    eng.load = lambda: (where.append(threading.current_thread()), load())[1]

    async def main():
        await eng.start()
        try:
            step_thread = await eng._in_worker(threading.current_thread)
        finally:
            await eng.stop()
        return step_thread
    step_thread = asyncio.run(main())
    assert where == [step_thread] and step_thread.name == "t2-engine"


def test_a_load_failure_reaches_start(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    eng = HFEngine(tmp_path / "m", cache_dir=tmp_path / "cache")
    with pytest.raises(Exception):
        asyncio.run(eng.start())
    eng._thread.join(10)                          # the thread ends right after handing over the error
    assert not eng._thread.is_alive()
