"""Helpers for the gateway integration tests (no tests here): real simulators, gateways and redis-server."""
from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import yaml

from harness import ServerProcess, console_script, free_port, wait_until

API_KEY = "sk-cxygpt-test"
OTHER_KEY = "sk-cxygpt-bronze"


def start_sim(tmp: Path, name: str = "qwen3-14b", *, extra_names: tuple[str, ...] = (), max_num_seqs: int = 8,
              ttft_ms: float = 20, itl_ms: float = 5, max_model_len: int = 4096,
              extra_args: tuple[str, ...] = ()) -> ServerProcess:
    port = free_port()
    argv = [console_script("cxygpt-sim"), "serve", "Qwen/Qwen3-14B", "--served-model-name", name, *extra_names,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
            "--sim-jitter", "0", "--sim-seed", "1", *extra_args]
    return ServerProcess(argv, port=port, log_path=tmp / f"sim-{port}.log").start()


def write_keys(tmp: Path) -> Path:
    path = tmp / "keys.yaml"
    path.write_text(yaml.safe_dump({
        "allow_anonymous": False,
        "tiers": {"gold": {"priority": 0}, "bronze": {"priority": 10, "rate_qps": 100}},
        "keys": [{"id": "team-gold", "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "tier": "gold"},
                 {"id": "team-bronze", "key_sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(),
                  "tier": "bronze"}]}))
    return path


def start_gateway(tmp: Path, config: dict, *, env: dict | None = None, extra_args: tuple[str, ...] = (),
                  port: int | None = None) -> ServerProcess:
    port = port or free_port()
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [console_script("cxygpt-gateway"), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
            *extra_args]
    return ServerProcess(argv, port=port, log_path=tmp / f"gateway-{port}.log", health="/healthz",
                         env=env).start()


class RedisProcess(ServerProcess):
    """redis-server on a free port, no persistence; healthy when it answers PING (RESP, not HTTP)."""

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited with {self.proc.returncode}:\n{self.log()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


def start_redis(tmp: Path) -> ServerProcess | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    return RedisProcess([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                        port=port, log_path=tmp / f"redis-{port}.log").start()


def metric(url: str, name: str, **labels) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(?:\{([^}]*)\})?\s+(\S+)$", line)
        if m and m.group(1) == name and all(p in (m.group(2) or "") for p in want.split(",") if p):
            return float(m.group(3))
    return 0.0


def promtool_check(text: str) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        return
    out = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


__all__ = ["API_KEY", "OTHER_KEY", "metric", "promtool_check", "start_gateway", "start_redis", "start_sim",
           "wait_until", "write_keys"]
