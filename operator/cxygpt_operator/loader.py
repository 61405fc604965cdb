"""`cxygpt-cache-load`: the model cache's download Job: huggingface_hub's snapshot_download into the claim."""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import PERMANENT_EXIT, gib

MANIFEST = ".cxygpt-cache.json"  # beside the repository's folder: what was downloaded, at which commit, verified
PROGRESS_S = 2.0
CHUNK = 8 * 2**20


class Failure(Exception):
    """A failed attempt: its reason, message, and whether a retry could help."""

    def __init__(self, reason: str, message: str, permanent: bool = False):
        super().__init__(message)
        self.reason, self.message, self.permanent = reason, message, permanent


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    blob_id: str          # git's blob sha1
    sha256: str | None    # an LFS file's content hash


def emit(event: str, **fields) -> None:
    """One JSON line on stdout: the operator reads the last progress line from the pod's log."""
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def _hub_failure(error: Exception, repo: str, revision: str) -> Failure:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(error, GatedRepoError):  # a subclass of RepositoryNotFoundError
        return Failure("GatedRepo", f"{repo} is gated: accept its terms on the Hub and give a token of that account "
                       "(spec.model.cache.tokenSecretRef)", permanent=True)
    if isinstance(error, RepositoryNotFoundError):
        return Failure("RepositoryNotFound", f"{repo} is not on the Hub (or it is private and the token, if any, "
                       "has no access: spec.model.cache.tokenSecretRef)", permanent=True)
    if isinstance(error, RevisionNotFoundError):
        return Failure("RevisionNotFound", f"{repo} has no revision {revision!r}", permanent=True)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return Failure("Unauthorized", f"the Hub refused the token for {repo} ({status})", permanent=True)
    return Failure("HubError", f"{type(error).__name__}: {error}".splitlines()[0])


def resolve(api, repo: str, revision: str) -> tuple[str, list[RepoFile]]:
    """The commit the revision names now (so the download is pinned to it), and the files at that commit."""
    from huggingface_hub.hf_api import RepoFile as HubFile
    sha = api.model_info(repo, revision=revision).sha
    files = [RepoFile(f.path, f.size, f.blob_id, f.lfs.sha256 if f.lfs else None)
             for f in api.list_repo_tree(repo, revision=sha, recursive=True) if isinstance(f, HubFile)]
    return sha, sorted(files, key=lambda f: f.path)


def on_disk(target: Path) -> int:
    """Bytes downloaded so far: finished files and the partial ones huggingface_hub resumes from."""
    total = 0
    for path in target.rglob("*"):
        try:
            if path.is_file() and (".cache" not in path.relative_to(target).parts or path.suffix == ".incomplete"):
                total += path.stat().st_size
        except (OSError, ValueError):
            pass  # renamed or removed meanwhile
    return total


def git_blob_sha1(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(target: Path, files: list[RepoFile]) -> list[str]:
    """The files whose size or hash differs from the Hub's (the LFS sha256, else git's blob sha1)."""
    bad = []
    for f in files:
        path = target / f.path
        if not path.is_file() or path.stat().st_size != f.size:
            bad.append(f.path)
        elif (sha256(path) != f.sha256) if f.sha256 else (git_blob_sha1(path, f.size) != f.blob_id):
            bad.append(f.path)
    return bad


def _forget(target: Path, path: str) -> None:
    """A bad file and huggingface_hub's record of it, so the next attempt downloads it again."""
    for stale in (target / path, target / ".cache" / "huggingface" / "download" / f"{path}.metadata"):
        stale.unlink(missing_ok=True)


RESUME_CHUNK = 2**20
PARTIAL = ".cxygpt-partial"  # under the repository's folder: LFS files being downloaded, kept across attempts


def fetch_resumable(repo: str, sha: str, target: Path, files: list[RepoFile], max_workers: int) -> None:
    """The LFS files (the weights) with byte-level resume across attempts: huggingface_hub 2.x downloads each
    file to a temporary name it deletes when an attempt dies, so a killed pod would lose every file in flight.
    Each file is fetched with huggingface_hub's own metadata call (the Hub's redirect to its CDN) and http_get
    from what an earlier attempt left (a Range request), then moved into place, where snapshot_download finds it
    and checks it against the sha256 the Hub gave."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    # http_get writes what it received every DOWNLOAD_CHUNK_SIZE (10 MiB): a killed attempt loses at most this
    constants.DOWNLOAD_CHUNK_SIZE = RESUME_CHUNK

    def one(f: RepoFile) -> None:
        final = target / f.path
        if final.is_file() and final.stat().st_size == f.size:
            return
        part = target / PARTIAL / f.path
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:
            part.unlink()
            have = 0
        if have < f.size:
            url = hf_hub_url(repo, f.path, revision=sha)
            meta = get_hf_file_metadata(url)
            headers = build_hf_headers()
            if urlparse(meta.location).netloc != urlparse(url).netloc:
                headers.pop("authorization", None)  # a CDN's signed URL: the token stays on the Hub
            with open(part, "ab") as out:
                http_get(meta.location, out, resume_size=have, headers=headers, expected_size=f.size)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(one, [f for f in files if f.sha256]))


def download(repo: str, revision: str, root: Path, max_workers: int) -> dict:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    target = root / repo
    api = HfApi()
    try:
        sha, files = resolve(api, repo, revision)
    except HfHubHTTPError as e:
        raise _hub_failure(e, repo, revision) from None
    except Exception as e:  # the HTTP client's own: refused, timed out, ...
        raise Failure("HubUnreachable", f"{type(e).__name__}: {e}".splitlines()[0]) from None
    total = sum(f.size for f in files)
    emit("resolved", repo=repo, requestedRevision=revision, revision=sha, bytesTotal=total, filesTotal=len(files))
    target.mkdir(parents=True, exist_ok=True)
    have, free = on_disk(target), shutil.disk_usage(root).free
    if total - have > free:
        raise Failure("InsufficientStorage", f"{repo}@{sha[:12]} is {gib(total)}; the claim has {gib(free)} free and "
                      f"{gib(have)} downloaded: raise spec.model.cache.size (weights) or the profile table's "
                      "lora.cache_size (adapters)", permanent=True)
    stop = threading.Event()

    def report():
        while not stop.wait(PROGRESS_S):
            emit("progress", revision=sha, bytesDone=min(on_disk(target), total), bytesTotal=total,
                 filesTotal=len(files))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    emit("progress", revision=sha, bytesDone=min(have, total), bytesTotal=total, filesTotal=len(files))
    try:
        fetch_resumable(repo, sha, target, files, max_workers)
        # the rest (config, tokenizer), and huggingface_hub's record of every file (local_dir metadata)
        snapshot_download(repo, revision=sha, local_dir=target, max_workers=max_workers)
    except HfHubHTTPError as e:
        raise _hub_failure(e, repo, revision) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise Failure("InsufficientStorage", f"the claim ran out of space downloading {repo}: raise "
                          "spec.model.cache.size", permanent=True) from None
        raise Failure("DownloadError", f"{type(e).__name__}: {e}".splitlines()[0]) from None
    except Exception as e:
        raise Failure("DownloadError", f"{type(e).__name__}: {e}".splitlines()[0]) from None
    finally:
        stop.set()
        reporter.join()
    bad = verify(target, files)
    if bad:
        for path in bad:
            _forget(target, path)
        raise Failure("VerificationFailed", f"{len(bad)} file(s) differ from the Hub's size or hash "
                      f"({', '.join(bad[:3])}): removed, the next attempt downloads them again")
    manifest = {"repo": repo, "requestedRevision": revision, "revision": sha, "bytes": total,
                "files": {f.path: {"size": f.size, **({"sha256": f.sha256} if f.sha256 else {"blobId": f.blob_id})}
                          for f in files}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(target / PARTIAL, ignore_errors=True)
    emit("progress", revision=sha, bytesDone=total, bytesTotal=total, filesTotal=len(files))
    return {"revision": sha, "bytes": total, "files": len(files)}


def _write(path: str | None, result: dict) -> None:
    """The termination log: Kubernetes shows it as the container's termination message (4 KiB at most)."""
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(result, sort_keys=True)[:4000])
    except OSError as e:
        print(f"cxygpt-cache-load: termination log {path} not written: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxygpt-cache-load", description=__doc__)
    ap.add_argument("--repo", required=True, help="Org/Name on the Hub ($HF_ENDPOINT; token from $HF_TOKEN)")
    ap.add_argument("--revision", default="main", help="branch, tag or commit (resolved to a commit and pinned)")
    ap.add_argument("--dir", required=True, help="the claim's mount: the files go to <dir>/<Org>/<Name>")
    ap.add_argument("--termination-log", default=os.environ.get("CXYGPT_TERMINATION_LOG"),
                    help="where the result (or the failure) is written for the operator")
    ap.add_argument("--max-workers", type=int, default=4, help="files downloaded at once (default 4)")
    a = ap.parse_args(argv)
    began = time.monotonic()
    try:
        result = download(a.repo, a.revision, Path(a.dir), a.max_workers)
    except Failure as f:
        emit("failed", reason=f.reason, message=f.message, permanent=f.permanent)
        _write(a.termination_log, {"reason": f.reason, "message": f.message})
        return PERMANENT_EXIT if f.permanent else 1
    emit("done", seconds=round(time.monotonic() - began, 3), **result)
    _write(a.termination_log, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
