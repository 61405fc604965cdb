"""A container as a local process (the container runtime's part of kubelet): its command line on this machine, its
output in a log file and a tail, its exit as kubelet reports it, and the probes that judge it."""
from __future__ import annotations

import asyncio
import collections
import datetime
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .processes import forward_lines, stop_group

TAIL_LINES, TAIL_BYTES = 80, 2048  # kubelet's FallbackToLogsOnError message: the last lines of the output
TERMINATION_BYTES = 4096           # kubelet reads at most this much of terminationMessagePath
# programs an image would run that this machine runs in their place: vLLM has no GPU here, so the simulator (same
# arguments and API) stands in for it
STAND_INS = {"vllm": "cxygpt-sim"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_program(name: str) -> str:
    """A program of an image as this machine has it: a console script of this environment, else one on PATH
    (`python` is this interpreter)."""
    name = STAND_INS.get(name, name)
    if name in ("python", "python3"):
        return sys.executable
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def exit_code(returncode: int) -> int:
    """A process killed by a signal exits with 128 + its number, as kubelet reports it."""
    return returncode if returncode >= 0 else 128 - returncode


def tail_message(lines) -> str:
    return "\n".join(lines).encode()[-TAIL_BYTES:].decode(errors="ignore")


def requests_in_flight(metrics: str) -> float:
    """vllm:num_requests_running + vllm:num_requests_waiting from a Prometheus text exposition (an engine whose
    preStop drain is done has none)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Run:
    """One run of a container: the process, its log file and tail, and how it ended."""
    argv: list[str]
    env: dict[str, str]
    log_file: Path
    termination_file: Path | None = None
    output: object = None  # callable(line) for a live view of the output
    process: asyncio.subprocess.Process | None = None
    started_at: str = ""
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    pump: asyncio.Task | None = None

    async def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        self.started_at = now()
        self.pump = asyncio.create_task(forward_lines(self.process, self._emit))

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        with open(self.log_file, "a") as f:  # kubelet's log file, served as pods/log
            f.write(f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='microseconds')} {line}\n")
        if self.output:
            self.output(line)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def wait(self) -> int:
        code = await self.process.wait()
        await asyncio.gather(self.pump, return_exceptions=True)
        return exit_code(code)

    async def stop(self, grace_s: float) -> None:
        await stop_group(self.process, grace_s)

    def terminated(self, code: int, *, reason: str | None = None, fallback_to_logs: bool = False) -> dict:
        """containerStatuses[].state.terminated for this run."""
        message = ""
        if self.termination_file and self.termination_file.exists():
            message = self.termination_file.read_text(errors="replace")[:TERMINATION_BYTES]
        if not message.strip() and code and fallback_to_logs:
            message = tail_message(self.tail)
        return {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                **({"message": message} if message else {}), "startedAt": self.started_at, "finishedAt": now()}


def named_port(container: dict, port) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container {container.get('name')!r} has no port named {port!r}")


async def probe_once(probe: dict, container: dict, pod_ip: str, session: aiohttp.ClientSession,
                     exec_in_pod) -> tuple[bool, str]:
    """One try of a probe as kubelet makes it: (success, why it failed). `exec_in_pod(argv)` runs a command in the
    pod's namespaces and returns its exit code."""
    timeout = probe.get("timeoutSeconds", 1)
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = (f"{get.get('scheme', 'HTTP').lower()}://{get.get('host') or pod_ip}:"
                   f"{named_port(container, get['port'])}{get.get('path', '/')}")
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            async with session.get(url, headers=headers, ssl=False, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                ok = 200 <= resp.status < 400
                return ok, "" if ok else f"HTTP probe failed with statuscode: {resp.status}"
        if "tcpSocket" in probe:
            port = named_port(container, probe["tcpSocket"]["port"])
            _, writer = await asyncio.wait_for(asyncio.open_connection(probe["tcpSocket"].get("host") or pod_ip, port),
                                               timeout)
            writer.close()
            return True, ""
        if "exec" in probe:
            code = await asyncio.wait_for(exec_in_pod(probe["exec"]["command"]), timeout)
            return code == 0, "" if code == 0 else f"command exited with {code}"
        return False, "probe handler not supported here (httpGet, tcpSocket and exec are)"
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        return False, f"probe failed: {type(e).__name__}: {e}"
