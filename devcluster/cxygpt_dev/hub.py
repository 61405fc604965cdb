"""A local Hugging Face Hub: the part of the Hub's HTTP API that huggingface_hub's downloader uses, serving the
repositories of a directory (<root>/<org>/<name>/...) to HF_ENDPOINT=http://127.0.0.1:<port>, with no internet."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

log = logging.getLogger("cxygpt.hub")
# what .gitattributes sends to LFS on the Hub by default (by suffix), and anything of 10 MiB or more
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
LFS_MIN_BYTES = 10 * 2**20
CHUNK = 64 * 1024
TOKEN_FILE = ".hub-token"  # in a repository's folder: requests need `Authorization: Bearer <its content>`
DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    blob_id: str            # git's blob sha1 of the content (of the LFS pointer for an LFS file)
    sha256: str | None      # an LFS file's content hash
    file: Path

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n").encode()


def _hash(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# LoRA adapters of the catalog's small model, served beside the catalog's stand-ins (the examples name them):
# repository -> (base model, rank, lora_alpha, target modules)
ADAPTER_STAND_INS = {
    "cxygpt-demo/qwen3-0.6b-sql-lora": ("Qwen/Qwen3-0.6B", 8, 16, ("q_proj", "v_proj")),
    "cxygpt-demo/qwen3-0.6b-support-lora": ("Qwen/Qwen3-0.6B", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")),
}


def catalog_stand_ins(mib_per_gib: float) -> dict[str, Callable[[Path], Path]]:
    """For every repository of the model catalog (and its variants): weights of `mib_per_gib` MiB per GiB of the
    real ones and a config.json from its facts; and the adapters of ADAPTER_STAND_INS. Each made on first request."""
    from cxygpt_profiles import default_catalog, default_table
    from cxygpt_profiles.fit import weight_bytes
    catalog, consts = default_catalog(), default_table().fit
    found = {}
    for repo, entry in catalog.models.items():
        facts = catalog.lookup(repo)
        config = {"architectures": ["ForCausalLM"], "hidden_size": facts.hidden_size,
                  "num_hidden_layers": facts.layers, "num_attention_heads": facts.attention_heads,
                  "num_key_value_heads": facts.kv_heads, "head_dim": facts.head_dim, "vocab_size": facts.vocab_size,
                  "max_position_embeddings": facts.max_context, "tie_word_embeddings": facts.tied_embeddings,
                  "torch_dtype": "bfloat16"}
        for fmt, repo_id in (("bf16", repo), *entry.variants.items()):
            size = max(int(weight_bytes(facts, fmt, consts) / 2**30 * mib_per_gib * 2**20), 4096)
            found[repo_id] = functools.partial(make_repo, repo_id=repo_id, weights_bytes=size, config=config)
    for repo_id, (base, rank, alpha, targets) in ADAPTER_STAND_INS.items():
        found[repo_id] = functools.partial(make_adapter_repo, repo_id=repo_id, base_model=base, rank=rank,
                                           alpha=alpha, target_modules=targets)
    return found


@dataclass
class Hub:
    root: Path
    rate_bytes_s: float | None = None        # shared by every download, like one uplink
    # repositories made on their first request when not on disk: id -> what makes it under a root
    stand_ins: dict[str, Callable[[Path], Path]] = field(default_factory=dict)
    # LFS content is served from another origin (another port), as the Hub's CDN: huggingface_hub then reads the
    # file's metadata from the redirect itself and sends no token there (the URL is signed instead)
    cdn_url: str | None = None
    _secret: bytes = field(default_factory=lambda: os.urandom(16))
    stats: dict = field(default_factory=lambda: {"bytes": 0, "requests": 0, "range_requests": 0, "files": {}})
    _hashes: dict = field(default_factory=dict)
    _sent_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- repositories on disk ---------------------------------------------------------------------------------

    def repo_dir(self, org: str, name: str) -> Path | None:
        path = (self.root / org / name)
        return path if path.is_dir() and path.resolve().is_relative_to(self.root.resolve()) else None

    def entries(self, repo: Path) -> list[Entry]:
        found = []
        for file in sorted(p for p in repo.rglob("*") if p.is_file() and p.name != TOKEN_FILE
                           and ".git" not in p.relative_to(repo).parts):
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime_ns)
            if key not in self._hashes:
                lfs = file.suffix in LFS_SUFFIXES or stat.st_size >= LFS_MIN_BYTES
                sha256 = _hash(file, "sha256") if lfs else None
                blob = git_blob_sha1(Entry("", stat.st_size, "", sha256, file).pointer) if lfs \
                    else _hash(file, "sha1", b"blob %d\0" % stat.st_size)
                self._hashes[key] = (blob, sha256)
            blob, sha256 = self._hashes[key]
            found.append(Entry(file.relative_to(repo).as_posix(), stat.st_size, blob, sha256, file))
        return found

    @staticmethod
    def commit(entries: list[Entry]) -> str:
        """One commit per content: the digest of every path and blob (what `main` points to)."""
        return hashlib.sha1("".join(f"{e.path}\0{e.blob_id}\n" for e in entries).encode()).hexdigest()

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.model_info)
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self.model_info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}/{path:.*}", self.tree)
        app.router.add_route("HEAD", "/{org}/{name}/resolve/{revision}/{path:.*}", self.resolve)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.*}", self.resolve, allow_head=False)
        app.router.add_route("HEAD", "/lfs/{org}/{name}/{sha256}", self.lfs)
        app.router.add_get("/lfs/{org}/{name}/{sha256}", self.lfs, allow_head=False)
        app.router.add_get("/_dev/stats", self.dev_stats)
        app.router.add_post("/_dev/stats/reset", self.dev_reset)
        app.router.add_get("/health", lambda _: web.Response(text="ok"))
        return app

    @staticmethod
    def _error(status: int, code: str, message: str, commit: str | None = None) -> web.Response:
        # huggingface_hub maps X-Error-Code to its errors (RepositoryNotFoundError, RevisionNotFoundError, ...)
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        return web.json_response({"error": message}, status=status, headers=headers)

    def _open(self, request) -> tuple[Path, list[Entry], str] | web.Response:
        """The repository, its files and the commit the revision names; or the Hub's error answer."""
        org, name = request.match_info["org"], request.match_info["name"]
        self.stats["requests"] += 1
        repo = self.repo_dir(org, name)
        if repo is None and f"{org}/{name}" in self.stand_ins:
            repo = self.stand_ins[f"{org}/{name}"](self.root)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        token_file = repo / TOKEN_FILE
        if token_file.exists():
            token = token_file.read_text().strip()
            if request.headers.get("Authorization") != f"Bearer {token}":
                return self._error(401, "GatedRepo", f"Access to model {org}/{name} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
        entries = self.entries(repo)
        commit = self.commit(entries)
        revision = request.match_info.get("revision", DEFAULT_BRANCH)
        if revision not in (DEFAULT_BRANCH, commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, entries, commit

    async def model_info(self, request) -> web.Response:
        opened = self._open(request)
        if isinstance(opened, web.Response):
            return opened
        repo, entries, commit = opened
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        modified = datetime.datetime.fromtimestamp(max((e.file.stat().st_mtime for e in entries), default=0),
                                                   datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        blobs = request.query.get("blobs") in ("true", "1")
        siblings = [{"rfilename": e.path, **({"size": e.size, "blobId": e.blob_id} if blobs else {}),
                     **({"lfs": {"sha256": e.sha256, "size": e.size, "pointerSize": len(e.pointer)}}
                        if blobs and e.sha256 else {})} for e in entries]
        return web.json_response({"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                                  "modelId": repo_id, "sha": commit, "private": False, "gated": False,
                                  "disabled": False, "downloads": 0, "likes": 0, "tags": [], "lastModified": modified,
                                  "createdAt": modified, "siblings": siblings})

    async def tree(self, request) -> web.Response:
        opened = self._open(request)
        if isinstance(opened, web.Response):
            return opened
        _, entries, commit = opened
        prefix = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive") in ("true", "1", "True")
        items, dirs = [], set()
        for e in entries:
            if prefix and not e.path.startswith(prefix + "/"):
                continue
            rest = e.path[len(prefix) + 1:] if prefix else e.path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": e.blob_id, "size": e.size, "path": e.path}
                if e.sha256:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(e.pointer)}
                items.append(item)
        items += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                  for d in sorted(dirs)]
        return web.json_response(sorted(items, key=lambda i: i["path"]), headers={"X-Repo-Commit": commit})

    async def resolve(self, request) -> web.StreamResponse:
        """A file at a revision: small files are served here (ETag = git blob sha1); LFS files redirect to their
        content, as the Hub redirects to its CDN (X-Linked-Etag = sha256, X-Linked-Size)."""
        opened = self._open(request)
        if isinstance(opened, web.Response):
            return opened
        _, entries, commit = opened
        path = request.match_info["path"]
        entry = next((e for e in entries if e.path == path), None)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{request.match_info['revision']}\"",
                               commit)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if entry.sha256:
            org, name = request.match_info["org"], request.match_info["name"]
            base = self.cdn_url or f"{request.scheme}://{request.host}"
            location = f"{base}/lfs/{org}/{name}/{entry.sha256}?signature={self._sign(org, name, entry.sha256)}"
            headers.update({"Location": location, "X-Linked-Etag": f'"{entry.sha256}"',
                            "X-Linked-Size": str(entry.size), "ETag": f'"{entry.blob_id}"'})
            return web.Response(status=302, headers=headers)
        return await self._send(request, entry, {**headers, "ETag": f'"{entry.blob_id}"'})

    def _sign(self, org: str, name: str, sha256: str) -> str:
        return hmac.new(self._secret, f"{org}/{name}/{sha256}".encode(), "sha256").hexdigest()

    async def lfs(self, request) -> web.StreamResponse:
        """An LFS file's content by its sha256, at the signed URL the resolve redirect gave."""
        org, name, sha256 = (request.match_info[k] for k in ("org", "name", "sha256"))
        if not hmac.compare_digest(request.query.get("signature", ""), self._sign(org, name, sha256)):
            return web.Response(status=403, text="Request has expired or the signature does not match")
        repo = self.repo_dir(org, name)
        if repo is None:
            return self._error(404, "EntryNotFound", "no such object")
        entries = self.entries(repo)
        entry = next((e for e in entries if e.sha256 == request.match_info["sha256"]), None)
        if entry is None:
            return self._error(404, "EntryNotFound", "no such object")
        return await self._send(request, entry, {"ETag": f'"{entry.sha256}"', "Accept-Ranges": "bytes"})

    async def _send(self, request, entry: Entry, headers: dict) -> web.StreamResponse:
        """The file, or the byte range asked for (a resumed download), at the hub's shared rate."""
        start, end, status = 0, entry.size - 1, 200
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].split(",")[0].partition("-")
            start = int(first) if first else max(entry.size - int(last or 0), 0)
            end = min(int(last), entry.size - 1) if first and last else entry.size - 1
            if start >= entry.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            self.stats["range_requests"] += 1
        length = end - start + 1
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(length),
                                                               "Content-Type": "application/octet-stream"})
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        with open(entry.file, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                await self._throttle(len(chunk))
                await response.write(chunk)
                left -= len(chunk)
                self.stats["bytes"] += len(chunk)  # per chunk: downloads of one file at once all count
                self.stats["files"][entry.path] = self.stats["files"].get(entry.path, 0) + len(chunk)
        await response.write_eof()
        return response

    async def _throttle(self, n: int) -> None:
        """One shared uplink: each chunk waits for its slot at the configured rate."""
        if not self.rate_bytes_s:
            return
        async with self._lock:
            now = time.monotonic()
            self._sent_at = max(self._sent_at, now) + n / self.rate_bytes_s
            delay = self._sent_at - now
        if delay > 0:
            await asyncio.sleep(delay)

    async def dev_stats(self, request) -> web.Response:
        return web.json_response(self.stats)

    async def dev_reset(self, request) -> web.Response:
        self.stats.update(bytes=0, requests=0, range_requests=0, files={})
        return web.json_response(self.stats)


# --- repositories for the tests and the dev cluster -------------------------------------------------------------

def write_safetensors(path: Path, shapes: dict[str, list[int]], seed: str) -> None:
    """A safetensors file of BF16 tensors of these shapes, in this order, of pseudo-random bytes."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        meta[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(meta).encode()
    header += b" " * (-len(header) % 8)
    block = hashlib.sha512(seed.encode()).digest() * 1024  # 64 KiB that no compression shrinks much
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = offset
        while left > 0:
            piece = block[:min(len(block), left)]
            f.write(piece)
            left -= len(piece)
            block = hashlib.sha512(block[:64]).digest() * 1024


def fake_safetensors(path: Path, size: int, seed: str) -> None:
    """A safetensors file of about `size` bytes: a valid header and one BF16 tensor of pseudo-random bytes."""
    write_safetensors(path, {"weight": [max(size - 128, 2) // 2]}, seed)


def lora_shapes(base_model: str, rank: int, target_modules: tuple[str, ...]) -> dict[str, list[int]]:
    """PEFT's tensors of a LoRA adapter of a catalogued dense decoder: lora_A [rank, in], lora_B [out, rank] of each
    target module of each layer."""
    from cxygpt_profiles import default_catalog
    found = default_catalog().entry(base_model)
    if found is None:
        raise ValueError(f"{base_model} is not in the model catalog")
    e = found[1]
    q_out, kv_out, inter = e.attention_heads * e.head_dim, e.kv_heads * e.head_dim, e.intermediate_size
    dims = {"q_proj": ("self_attn", e.hidden_size, q_out), "k_proj": ("self_attn", e.hidden_size, kv_out),
            "v_proj": ("self_attn", e.hidden_size, kv_out), "o_proj": ("self_attn", q_out, e.hidden_size),
            "gate_proj": ("mlp", e.hidden_size, inter), "up_proj": ("mlp", e.hidden_size, inter),
            "down_proj": ("mlp", inter, e.hidden_size)}
    shapes = {}
    for layer in range(e.layers):
        for module in target_modules:
            block, in_features, out_features = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = [rank, in_features]
            shapes[f"{prefix}.lora_B.weight"] = [out_features, rank]
    return shapes


def make_adapter_repo(root: Path, repo_id: str, *, base_model: str, rank: int = 8, alpha: int = 16,
                      target_modules: tuple[str, ...] = ("q_proj", "v_proj"), config: dict | None = None) -> Path:
    """A LoRA adapter repository as PEFT saves one: adapter_config.json and adapter_model.safetensors with the
    tensors' real shapes for the catalogued base model (`config` entries override the written config's)."""
    repo = root / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": base_model, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": list(target_modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
        **(config or {})}, indent=1))
    (repo / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: peft\n---\n"
                                    f"A stand-in LoRA adapter (rank {rank}) of {base_model} for the dev cluster.\n")
    write_safetensors(repo / "adapter_model.safetensors", lora_shapes(base_model, rank, target_modules), repo_id)
    return repo


def make_repo(root: Path, repo_id: str, *, weights_bytes: int = 4 * 2**20, shard_bytes: int = 4 * 2**20,
              config: dict | None = None, token: str | None = None) -> Path:
    """A small model repository: config.json, a tokenizer, generation config and fake safetensors weights
    (sharded with an index beyond `shard_bytes`). Returns its folder."""
    repo = root / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "config.json").write_text(json.dumps(config or {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}, indent=1))
    (repo / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    (repo / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 40960, "eos_token": "<|im_end|>"}))
    (repo / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {
        f"t{i}": i for i in range(512)}, "merges": []}}))
    shards = max(1, -(-weights_bytes // shard_bytes))
    if shards == 1:
        fake_safetensors(repo / "model.safetensors", weights_bytes, repo_id)
    else:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for i, shard in enumerate(names):
            fake_safetensors(repo / shard, min(shard_bytes, weights_bytes - i * shard_bytes), f"{repo_id}/{i}")
        (repo / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": weights_bytes}, "weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    if token:
        (repo / TOKEN_FILE).write_text(token)
    return repo


def _free_port(host: str) -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def start(root: Path, host: str, port: int, rate_bytes_s: float | None = None,
                stand_ins: dict | None = None) -> tuple[web.AppRunner, Hub]:
    """The hub on host:port, its "CDN" (LFS content) on another port of the same host."""
    cdn_port = _free_port(host)
    hub = Hub(root, rate_bytes_s, stand_ins or {}, cdn_url=f"http://{host}:{cdn_port}")
    runner = web.AppRunner(hub.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await web.TCPSite(runner, host, cdn_port).start()
    return runner, hub


async def serve(root: Path, host: str, port: int, rate_bytes_s: float | None, stop: asyncio.Event,
                stand_ins: dict | None = None):
    runner, _ = await start(root, host, port, rate_bytes_s, stand_ins)
    print(f"hub listening on http://{host}:{port} serving {root}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cxygpt_dev.hub", description=__doc__)
    ap.add_argument("--root", type=Path, required=True, help="repositories: <root>/<org>/<name>/<files>")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--rate-mib-s", type=float, default=None, help="bandwidth shared by all downloads (MiB/s)")
    ap.add_argument("--make-repo", metavar="ORG/NAME", action="append", default=[],
                    help="create a small model repository first (repeatable)")
    ap.add_argument("--weights-mib", type=float, default=4, help="size of --make-repo's fake weights (MiB)")
    ap.add_argument("--catalog-stand-ins", type=float, metavar="MIB_PER_GIB", default=None,
                    help="also serve every model of the catalog, made on first request with this many MiB of fake "
                         "weights per GiB of the real ones, and the LoRA adapters of ADAPTER_STAND_INS")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for repo_id in a.make_repo:
        make_repo(a.root, repo_id, weights_bytes=int(a.weights_mib * 2**20))

    async def run():
        import signal
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stand_ins = catalog_stand_ins(a.catalog_stand_ins) if a.catalog_stand_ins else None
        await serve(a.root, a.host, a.port, a.rate_mib_s * 2**20 if a.rate_mib_s else None, stop, stand_ins)

    asyncio.run(run())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
