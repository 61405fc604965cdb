"""Helpers for tests on the real cluster: kubectl as a user types it, a namespace of the test's own, waiting for
objects."""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import yaml

from harness import console_script, wait_until


class Kubectl:
    def __init__(self, kubeconfig: Path, namespace: str | None = None, cache: Path | None = None):
        self.kubeconfig, self.namespace, self.cache = Path(kubeconfig), namespace, cache

    def run(self, *args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 150) -> subprocess.CompletedProcess:
        argv = [console_script("kubectl"), "--kubeconfig", str(self.kubeconfig),
                *(["--cache-dir", str(self.cache)] if self.cache else []),
                *(["-n", self.namespace] if self.namespace else []), *args]
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out

    def __call__(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout

    def apply(self, *docs: dict) -> str:
        return self("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))

    def get(self, kind: str, name: str | None = None, **kw) -> dict:
        return json.loads(self("get", kind, *([name] if name else []), "-o", "json", **kw))

    def items(self, kind: str, *args: str) -> list[dict]:
        return json.loads(self("get", kind, *args, "-o", "json"))["items"]

    def wait_for(self, predicate, what: str, timeout: float = 60):
        return wait_until(predicate, timeout=timeout, interval=0.2, what=what)

    def wait_established(self, crd: str, timeout: float = 30) -> None:
        """Until the API server serves the CRD. Not `kubectl wait --for=condition=Established`: right after the
        create its status.conditions is null, and kubectl wait fails on that (an accessor error) instead of waiting."""
        def established():
            conditions = self.get("crd", crd).get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
        wait_until(established, timeout=timeout, interval=0.2, what=f"{crd} Established")


def new_namespace(admin: Kubectl, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin("create", "namespace", name)
    return name
