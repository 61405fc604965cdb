"""The relay's deadlines on one loop timer, on a real event loop (asyncio's and uvloop's)."""
from __future__ import annotations

import asyncio

import pytest
import uvloop

from cxygpt_gateway.exchange.deadlines import SWEEP_SLACK, Deadline, Deadlines, deadlines_of


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


def recorder(loop, fired: list, done: asyncio.Future | None = None):
    """A callback factory: each call records its name and the loop time; `done` resolves on the named last one."""
    def make(name, last=False):
        def callback():
            fired.append((name, loop.time()))
            if last:
                done.set_result(None)
        return callback
    return make


@on_both_loops
async def test_entries_fire_in_time_order_and_cancelled_ones_never():
    loop = asyncio.get_running_loop()
    deadlines, fired, done = Deadlines(loop), [], loop.create_future()
    on = recorder(loop, fired, done)
    now = loop.time()
    late = deadlines.call_at(now + 0.6, on("late", last=True))
    deadlines.call_at(now + 0.05, on("middle"))
    gone = deadlines.call_at(now + 0.03, on("cancelled"))
    deadlines.call_at(now + 0.01, on("early"))  # earlier than the timer's aim: it is re-aimed
    deadlines.cancel(gone)
    deadlines.cancel(gone)  # idempotent
    await asyncio.wait_for(done, 5)  # the event itself, not a guess of how long it takes
    assert [name for name, _ in fired] == ["early", "middle", "late"] and len(deadlines) == 0
    assert fired[0][1] < now + 0.6  # re-aimed: the early one did not wait for the timer's first aim
    # not before their time (libuv's timers keep millisecond time: a few ms of slack)
    assert all(at >= due - 0.005 for (_, at), due in zip(fired, (now + 0.01, now + 0.05, now + 0.6)))
    deadlines.cancel(late)  # too late: nothing happens
    assert len(deadlines) == 0


@on_both_loops
async def test_cancelled_entries_do_not_pile_up():
    loop = asyncio.get_running_loop()
    deadlines, fired, done = Deadlines(loop), [], loop.create_future()
    keep = deadlines.call_at(loop.time() + 0.05, recorder(loop, fired, done)("kept", last=True))
    for _ in range(10_000):  # requests that end long before their timeout
        deadlines.cancel(deadlines.call_at(loop.time() + 600, fired.append))
    assert len(deadlines) == 1 and len(deadlines._heap) <= SWEEP_SLACK + 2 + 1
    await asyncio.wait_for(done, 5)
    assert [name for name, _ in fired] == ["kept"] and keep[2] is None


@on_both_loops
async def test_someone_elses_cancel_goes_on_as_a_cancel():
    deadlines = deadlines_of(asyncio.get_running_loop())

    async def guarded():
        with Deadline(deadlines, 5):
            await asyncio.sleep(1)

    task = asyncio.ensure_future(guarded())
    while len(deadlines) == 0:  # until the region has armed its deadline
        await asyncio.sleep(0)
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
