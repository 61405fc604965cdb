"""The Job controller of the dev cluster, and kubelet for its pods: each attempt of a Job is a Pod whose container
runs as a local process; status.active/succeeded/failed and the Complete/Failed conditions as the controller sets
them."""
from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import secrets
import string
import time
from pathlib import Path

import aiohttp

from .containers import TAIL_LINES, TERMINATION_BYTES, local_program, tail_message
from .processes import forward_lines, stop_group
from .volumes import Unbound, Volumes, rewrite, rewrite_all
from .watching import follow

log = logging.getLogger("cxygpt.pods")
# between failed attempts: the Job controller waits 10 s doubling to 6 min; the dev cluster is quicker
BACKOFF_S = (1, 2, 4, 8)
RETRY_S = 1.0
_ALNUM = string.ascii_lowercase + string.digits


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CannotStart(Exception):
    """kubelet cannot make the container (a Secret or key missing): it waits with this reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def finished(job: dict) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def fail_job_rule(job: dict, container: str, exit_code: int) -> int | None:
    """The index of the podFailurePolicy rule that fails the Job for this exit code, if any."""
    for i, rule in enumerate(((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []):
        codes = rule.get("onExitCodes") or {}
        if rule.get("action") != "FailJob" or codes.get("containerName", container) != container:
            continue
        hit = exit_code in codes.get("values", [])
        if hit == (codes.get("operator", "In") == "In"):
            return i
    return None


class Jobs:
    def __init__(self, runner, volumes: Volumes, logs: Path, output=None):
        self.runner, self.volumes, self.logs, self.output = runner, volumes, Path(logs), output
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}

    async def _request(self, *args, **kw):
        return await self.runner._request(*args, **kw)

    async def watch(self, session: aiohttp.ClientSession, api_url: str) -> None:
        async def handle(kind: str | None, job: dict) -> None:
            key = (job.get("metadata", {}).get("namespace"), job.get("metadata", {}).get("name"))
            if kind == "DELETED" or job.get("metadata", {}).get("deletionTimestamp"):
                task = self.tasks.pop(key, None)
                if task:
                    task.cancel()
            elif key not in self.tasks and not finished(job):
                self.tasks[key] = asyncio.create_task(self._run(job))

        await follow(session, api_url + "/apis/batch/v1/jobs?watch=true", handle, "job")

    async def stop_all(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the controller -------------------------------------------------------------------------------------------

    async def _job_status(self, job: dict, status: dict) -> None:
        md = job["metadata"]
        await self._request("PATCH", f"/apis/batch/v1/namespaces/{md['namespace']}/jobs/{md['name']}/status",
                            {"status": status})

    async def _end(self, job: dict, status: dict, condition: str, reason: str, message: str) -> None:
        now = _now()
        target = "SuccessCriteriaMet" if condition == "Complete" else "FailureTarget"
        conditions = [{"type": kind, "status": "True", "reason": reason, "message": message,
                       "lastProbeTime": now, "lastTransitionTime": now} for kind in (target, condition)]
        await self._job_status(job, {**status, "active": 0, "ready": 0, "conditions": conditions,
                                     **({"completionTime": now} if condition == "Complete" else {})})
        log.info("%s/%s: job %s (%s)", job["metadata"]["namespace"], job["metadata"]["name"], condition, reason)

    async def _run(self, job: dict) -> None:
        md, spec = job["metadata"], job.get("spec") or {}
        backoff_limit = spec.get("backoffLimit", 6)
        status = {k: v for k, v in (job.get("status") or {}).items() if k in ("startTime", "failed", "succeeded")}
        status.setdefault("startTime", _now())
        status.setdefault("failed", 0)
        started = datetime.datetime.strptime(status["startTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        deadline = spec.get("activeDeadlineSeconds")
        deadline_at = time.monotonic() - elapsed + deadline if deadline else None
        try:
            while True:
                await self._job_status(job, {**status, "active": 1})
                outcome, code, pod = await self._attempt(job, deadline_at)
                if outcome == "succeeded":
                    await self._end(job, {**status, "succeeded": 1}, "Complete", "CompletionsReached",
                                    "Reached expected number of succeeded pods")
                    return
                if outcome == "deadline":
                    await self._end(job, status, "Failed", "DeadlineExceeded",
                                    "Job was active longer than specified deadline")
                    return
                status["failed"] += 1
                container = spec["template"]["spec"]["containers"][0].get("name", "")
                rule = fail_job_rule(job, container, code)
                if rule is not None:
                    await self._end(job, status, "Failed", "PodFailurePolicy",
                                    f"Container {container} for pod {md['namespace']}/{pod} failed with exit code "
                                    f"{code} matching FailJob rule at index {rule}")
                    return
                if status["failed"] > backoff_limit:
                    await self._end(job, status, "Failed", "BackoffLimitExceeded",
                                    "Job has reached the specified backoff limit")
                    return
                await self._job_status(job, {**status, "active": 0})
                pause = BACKOFF_S[min(status["failed"] - 1, len(BACKOFF_S) - 1)]
                if deadline_at is not None and time.monotonic() + pause >= deadline_at:
                    await asyncio.sleep(max(deadline_at - time.monotonic(), 0))
                    await self._end(job, status, "Failed", "DeadlineExceeded",
                                    "Job was active longer than specified deadline")
                    return
                await asyncio.sleep(pause)
        except (RuntimeError, aiohttp.ClientError) as e:
            log.warning("%s/%s: job stopped: %s", md["namespace"], md["name"], e)
        finally:
            self.tasks.pop((md["namespace"], md["name"]), None)

    # --- kubelet ------------------------------------------------------------------------------------------------------

    async def _env(self, namespace: str, container: dict, mapping: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = rewrite(item["value"], mapping)
                continue
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            try:
                secret = await self._request("GET", f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
            except RuntimeError as e:
                if " 404 " in str(e) and not ref.get("optional"):
                    raise CannotStart("CreateContainerConfigError", f'secret "{ref["name"]}" not found') from None
                if " 404 " in str(e):
                    continue
                raise
            data = (secret.get("data") or {})
            if ref["key"] in data:
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif ref["key"] in (secret.get("stringData") or {}):
                env[item["name"]] = secret["stringData"][ref["key"]]
            elif not ref.get("optional"):
                raise CannotStart("CreateContainerConfigError",
                                  f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
        return env

    async def _pod_status(self, namespace: str, name: str, status: dict) -> None:
        await self._request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status})

    async def _attempt(self, job: dict, deadline_at: float | None) -> tuple[str, int, str]:
        """One pod: ("succeeded" | "failed" | "deadline", exit code, pod name)."""
        md = job["metadata"]
        ns, job_name, uid = md["namespace"], md["name"], md.get("uid", "")
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        cname = container.get("name", "")
        name = f"{job_name}-{''.join(secrets.choice(_ALNUM) for _ in range(5))}"
        labels = {**(template.get("metadata", {}).get("labels") or {}), "batch.kubernetes.io/job-name": job_name,
                  "job-name": job_name, "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
        await self._request("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": template["spec"], "status": {"phase": "Pending"}}, content_type="application/json")

        def overdue() -> bool:
            return deadline_at is not None and time.monotonic() >= deadline_at

        def waiting(reason: str, message: str) -> dict:
            return {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [{"name": cname, "ready": False, "restartCount": 0, "image": container.get(
                        "image", ""), "state": {"waiting": {"reason": reason, "message": message}}}]}

        shown = None
        while True:  # the scheduler: no node for a pod whose claim has no volume yet
            try:
                mapping = await self.volumes.mounts(ns, name, template["spec"], container)
                break
            except Unbound as e:
                if shown != str(e):
                    shown = str(e)
                    await self._pod_status(ns, name, {"phase": "Pending", "conditions": [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": f"0/1 nodes are available: {e}."}]})
            if overdue():
                return "deadline", 0, name
            await asyncio.sleep(RETRY_S)
        pod_dir = self.volumes.pod_dir(ns, name)
        pod_dir.mkdir(parents=True, exist_ok=True)
        message_path = container.get("terminationMessagePath", "/dev/termination-log")
        termination = pod_dir / "termination-log"
        termination.write_text("")
        mapping[message_path] = str(termination)
        shown = None
        while True:
            try:
                env = await self._env(ns, container, mapping)
                break
            except CannotStart as e:
                if shown != e.message:
                    shown = e.message
                    await self._pod_status(ns, name, waiting(e.reason, e.message))
            if overdue():
                return "deadline", 0, name
            await asyncio.sleep(RETRY_S)
        command = rewrite_all(container.get("command") or [], mapping)
        argv = [local_program(command[0]), *command[1:]] if command else []
        argv += rewrite_all(container.get("args") or [], mapping)
        log_file = self.logs / ns / name / f"{cname}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        tail: list[str] = []
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT, env=env,
                                                       start_new_session=True)
        started = _now()
        log.info("%s/%s: job pod %s started (pid %d)", ns, job_name, name, process.pid)
        await self._pod_status(ns, name, {
            "phase": "Running", "startTime": started, "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": cname, "ready": True, "started": True, "restartCount": 0,
                                   "image": container.get("image", ""), "state": {"running": {"startedAt": started}}}]})
        with open(log_file, "a", buffering=1) as logf:
            def emit(line: str):
                logf.write(line + "\n")
                tail.append(line)
                del tail[:-TAIL_LINES]
                if self.output:
                    self.output(name, line)

            pump = asyncio.create_task(forward_lines(process, emit))
            try:
                remaining = None if deadline_at is None else max(deadline_at - time.monotonic(), 0)
                code = await asyncio.wait_for(process.wait(), remaining)
                outcome = "succeeded" if code == 0 else "failed"
            except TimeoutError:
                await stop_group(process, 5)
                code, outcome = process.returncode, "deadline"
            except asyncio.CancelledError:  # the Job was deleted: its pod's container is stopped
                await stop_group(process, 5)
                raise
            finally:
                await asyncio.gather(pump, return_exceptions=True)
        exit_code = code if code >= 0 else 128 - code
        message = termination.read_text(errors="replace")[:TERMINATION_BYTES]
        if not message.strip() and exit_code and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = tail_message(tail)
        reason = "Completed" if exit_code == 0 else "DeadlineExceeded" if outcome == "deadline" else "Error"
        try:
            await self._pod_status(ns, name, {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": cname, "ready": False, "started": False, "restartCount": 0,
                                       "image": container.get("image", ""), "state": {"terminated": {
                                           "exitCode": exit_code, "reason": reason, "message": message,
                                           "startedAt": started, "finishedAt": _now()}}}]})
        except RuntimeError as e:  # deleted meanwhile (the Job went)
            log.info("%s/%s: pod %s not updated: %s", ns, job_name, name, e)
        self.volumes.forget_pod(ns, name)
        return outcome, exit_code, name
