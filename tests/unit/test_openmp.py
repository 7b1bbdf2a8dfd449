"""OpenMP pools per thread (``ops.openmp``): freeing the calling thread's workers, per-thread team sizes, and the
server's engine start freeing the loading thread's pool."""
import os
import threading

import pytest
import torch

from loraplex.ops import openmp

pytestmark = pytest.mark.skipif(not openmp.runtimes() or (os.cpu_count() or 1) < 2,
                                reason="needs an OpenMP runtime and two CPUs for a worker thread to exist")


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _in_thread(fn):
    """Run ``fn`` on a fresh thread (a thread of its own has no pool yet) and return its result."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _parallel_op() -> None:
    (torch.ones(1 << 22) * 2).sum()


def test_release_frees_the_calling_threads_workers():
    def run():
        start = _tasks()
        _parallel_op()
        with_pool = _tasks()
        released = openmp.release_thread_pool()
        after = _tasks()
        _parallel_op()  # the next region starts the workers again
        return start, with_pool, released, after, _tasks()

    start, with_pool, released, after, again = _in_thread(run)
    assert with_pool > start, "a parallel op on a fresh thread should start a worker"
    assert released and after == start
    assert again == with_pool


def test_thread_count_is_per_thread():
    def run():
        _parallel_op()  # ATen's per-thread set-up
        openmp.set_thread_count(1)
        openmp.release_thread_pool()
        start = _tasks()
        _parallel_op()
        return start, _tasks()

    start, after = _in_thread(run)
    assert after == start, "one thread per team: no worker started"
    assert torch.get_num_threads() == 2, "the process-wide count is unchanged"


def test_engine_start_frees_the_loading_threads_pool(tiny_llama_dir):
    from loraplex import LLM
    from loraplex.server.async_engine import AsyncEngine

    def run():
        engine = LLM(model=str(tiny_llama_dir), dtype="float32").llm_engine
        _parallel_op()
        with_pool = _tasks()
        ae = AsyncEngine(engine)
        ae.start()  # adds the engine thread; the loader's worker goes
        try:
            return with_pool, _tasks()
        finally:
            ae.shutdown()

    with_pool, started = _in_thread(run)
    assert started == with_pool, "the engine thread replaces the loading thread's worker"
