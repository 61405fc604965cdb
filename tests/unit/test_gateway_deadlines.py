"""The relay's deadlines on one loop timer, on a real event loop (asyncio's and uvloop's)."""
from __future__ import annotations

import asyncio

import pytest
import uvloop

from cxygpt_gateway.deadlines import SWEEP_SLACK, Deadline, Deadlines, deadlines_of


def on_both_loops(test):
    """The coroutine test, run on asyncio's event loop and on uvloop's (the gateway's)."""
    @pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
    def runner(run):
        run(test())
    runner.__name__ = test.__name__
    return runner


@on_both_loops
async def test_a_region_that_runs_over_ends_in_timeout_and_one_that_ends_in_time_does_not():
    deadlines = deadlines_of(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        with Deadline(deadlines, 0.02):
            await asyncio.sleep(1)
    with Deadline(deadlines, 0.5):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.6)  # the cancelled deadline's time passes: nothing is cancelled any more
    assert len(deadlines) == 0


@on_both_loops
async def test_entries_fire_in_time_order_and_cancelled_ones_never():
    loop = asyncio.get_running_loop()
    deadlines, fired = Deadlines(loop), []
    now = loop.time()
    late = deadlines.call_at(now + 0.08, lambda: fired.append("late"))
    deadlines.call_at(now + 0.05, lambda: fired.append("middle"))
    gone = deadlines.call_at(now + 0.03, lambda: fired.append("cancelled"))
    deadlines.call_at(now + 0.01, lambda: fired.append("early"))  # earlier than the timer's aim: it is re-aimed
    deadlines.cancel(gone)
    deadlines.cancel(gone)  # idempotent
    await asyncio.sleep(0.035)
    assert fired == ["early"]
    await asyncio.sleep(0.07)
    assert fired == ["early", "middle", "late"] and len(deadlines) == 0
    deadlines.cancel(late)  # too late: nothing happens
    assert len(deadlines) == 0


@on_both_loops
async def test_cancelled_entries_do_not_pile_up():
    loop = asyncio.get_running_loop()
    deadlines, fired = Deadlines(loop), []
    keep = deadlines.call_at(loop.time() + 0.05, lambda: fired.append("kept"))
    for _ in range(10_000):  # requests that end long before their timeout
        deadlines.cancel(deadlines.call_at(loop.time() + 600, fired.append))
    assert len(deadlines) == 1 and len(deadlines._heap) <= SWEEP_SLACK + 2 + 1
    await asyncio.sleep(0.08)
    assert fired == ["kept"] and keep[2] is None


@on_both_loops
async def test_someone_elses_cancel_goes_on_as_a_cancel():
    deadlines = deadlines_of(asyncio.get_running_loop())

    async def guarded():
        with Deadline(deadlines, 5):
            await asyncio.sleep(1)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


@on_both_loops
async def test_nested_deadlines_each_raise_only_their_own_timeout():
    deadlines = deadlines_of(asyncio.get_running_loop())
    with Deadline(deadlines, 1.0):  # the total: never reached
        with pytest.raises(TimeoutError):
            with Deadline(deadlines, 0.02):  # e.g. the first token's
                await asyncio.sleep(1)
        await asyncio.sleep(0.01)  # the outer region goes on, uncancelled
    assert not asyncio.current_task().cancelling()
