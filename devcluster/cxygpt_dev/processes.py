"""Child processes of the dev cluster: their output lines forwarded, their process groups stopped."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Callable


async def forward_lines(process: asyncio.subprocess.Process, emit: Callable[[str], None] | None) -> None:
    async for line in process.stdout:
        if emit:
            emit(line.decode(errors="replace").rstrip())


async def stop_group(process: asyncio.subprocess.Process | None, grace_s: float = 10) -> None:
    """SIGTERM to the process's group (it runs in its own session), SIGKILL if it outlives the grace time."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
