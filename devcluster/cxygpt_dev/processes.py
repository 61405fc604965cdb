"""Processes of the dev cluster: children's output lines forwarded, their process groups stopped; our own run until
SIGTERM or SIGINT."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine

# what one forwarded line keeps of a longer one (the rest is counted, not kept)
LINE_LIMIT = 16 * 1024


async def forward_lines(process: asyncio.subprocess.Process, emit: Callable[[str], None] | None,
                        limit: int = LINE_LIMIT) -> None:
    """Every line the process writes, to `emit`, until it closes its output. A line over `limit` bytes is cut (its
    length said): reading never stops early, since a writer whose pipe nobody drains blocks, whatever it serves."""
    line, cut = bytearray(), 0
    while chunk := await process.stdout.read(1 << 16):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            cut += _keep(line, chunk[start:end], limit)
            _emit(emit, line, cut)
            line, cut, start = bytearray(), 0, end + 1
        cut += _keep(line, chunk[start:], limit)
    if line or cut:
        _emit(emit, line, cut)


def _keep(line: bytearray, part: bytes, limit: int) -> int:
    """Appends what still fits in `line`; how many bytes of `part` did not."""
    room = max(limit - len(line), 0)
    line += part[:room]
    return max(len(part) - room, 0)


def _emit(emit: Callable[[str], None] | None, line: bytearray, cut: int) -> None:
    if emit:
        text = line.decode(errors="replace").rstrip()
        emit(f"{text}... [line cut: {len(line) + cut} bytes]" if cut else text)


async def stop_group(process: asyncio.subprocess.Process | None, grace_s: float = 10) -> None:
    """SIGTERM to the process's group (it runs in its own session), SIGKILL if it outlives the grace time."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def run_until_signalled(work: Coroutine) -> None:
    """Runs `work` until it ends or SIGTERM or SIGINT cancels it (how each of the cluster's processes is stopped)."""
    async def guarded():
        task = asyncio.create_task(work)
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(guarded())
