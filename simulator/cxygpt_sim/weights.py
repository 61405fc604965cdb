"""The engine's start: weights from a local directory, or downloaded from the Hub first (as vLLM does), then read
at a disk's rate; the server listens only afterwards, so start time follows the weights' size and source."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cxygpt_sim")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DEFAULT_LOAD_GIB_PER_S = 2.0  # reading safetensors from a local NVMe disk or a fast network volume
GIB = 2**30


class WeightsError(RuntimeError):
    """The weights cannot be had (vLLM stops at start for the same reasons)."""


@dataclass(frozen=True)
class Loaded:
    source: str          # "local" (a directory), "hub" (downloaded now), "hub-cache" (offline, already cached), "none"
    path: str | None
    weight_bytes: int
    download_s: float
    read_s: float

    def describe(self) -> str:
        size = f"{self.weight_bytes / 2**20:.1f} MiB of weights"
        if self.source == "none":
            return "weights: none read (a hub model with no HF_ENDPOINT: the simulator never reaches the internet)"
        got = f"downloaded in {self.download_s:.2f}s, " if self.source == "hub" else ""
        return f"weights: {size} from {self.source} {self.path}: {got}read in {self.read_s:.2f}s"


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def looks_local(model: str) -> bool:
    return model.startswith(("/", "./", "../")) or Path(model).exists()


def fetch(model: str, revision: str | None, env: Mapping[str, str]) -> tuple[str, Path | None, float]:
    """(source, directory, download seconds) of the model's weights."""
    if looks_local(model):
        path = Path(model)
        if not path.is_dir():
            log.warning("model path %s does not exist here: starting with no weights read", model)
            return "local", None, 0.0
        return "local", path, 0.0
    offline = env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not env.get("HF_ENDPOINT"):
        return "none", None, 0.0
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    began = time.monotonic()
    try:
        snapshot = snapshot_download(model, revision=revision, local_files_only=offline)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise WeightsError(f"cannot get the weights of {model}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return ("hub-cache" if offline else "hub"), Path(snapshot), time.monotonic() - began


def load(model: str, revision: str | None, gib_per_s: float, env: Mapping[str, str] | None = None) -> Loaded:
    """Gets the weights and takes the time reading them would: their bytes at `gib_per_s`."""
    env = os.environ if env is None else env
    source, path, download_s = fetch(model, revision, env)
    size = weight_bytes(path) if path else 0
    read_s = size / GIB / gib_per_s if gib_per_s > 0 else 0.0
    time.sleep(read_s)
    return Loaded(source, str(path) if path else None, size, download_s, read_s)
