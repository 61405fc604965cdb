"""LoRA adapters read and checked as vLLM 0.33's worker loads them: the path resolved (a Hub repository downloaded
first), adapter_config.json checked as PEFTHelper does, the tensors' names and shapes against the base's layers."""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .lora import BaseLayers

# set by the dev cluster's kubelet, whose containers share this machine's root filesystem: {mount path in the
# container: directory here}. It maps the arguments it starts a process with; a path sent at runtime is mapped here.
MOUNTS_ENV = "CXYGPT_CONTAINER_MOUNTS"
MAX_HEADER_BYTES = 16 * 2**20   # a safetensors header past this is refused (the format's own bound is 100 MB)
TENSOR_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")     # PEFTHelper's fields without a default
INITS_SUPPORTED = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
EMBEDDING_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
LAYER_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(BaseLayers.MODULES) + r")$")


class AdapterError(Exception):
    """vLLM's worker refuses the adapter with this message (the API answers 500, the message after "Call to add_lora
    method failed: ")."""


class AdapterNotFound(AdapterError):
    """No adapter_config.json where the path leads (vLLM's LoRAAdapterNotFoundError: a 404)."""

    def __init__(self, name: str, path: str):
        super().__init__(f"Loading lora {name} failed: No adapter found for {path}")


@dataclass(frozen=True)
class AdapterFiles:
    """What the worker reads of an adapter."""
    directory: str
    config: dict                            # adapter_config.json
    tensor_file: str | None                 # adapter_model.safetensors, .bin or .pt
    tensors: dict[str, list[int]] | None    # name -> shape, from a safetensors header; None for .bin/.pt
    weight_bytes: int                       # the tensors file's size, which reading it costs


# --- reading (I/O) ----------------------------------------------------------------------------------------------

def mounted(path: str, env: Mapping[str, str]) -> str:
    """An absolute path in the container where it is on this machine (MOUNTS_ENV's longest mount holding it)."""
    try:
        mounts = json.loads(env.get(MOUNTS_ENV) or "{}")
    except ValueError:
        return path
    mounts = mounts if isinstance(mounts, dict) else {}
    inside = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    if not inside:
        return path
    mount = max(inside, key=len)
    return str(mounts[mount]) + path[len(mount.rstrip("/")):]


def resolve(path: str, env: Mapping[str, str]) -> str:
    """vLLM's get_adapter_absolute_path: an absolute path as it is, ~ expanded, an existing relative path made
    absolute, anything else a Hub repository id downloaded (HF_ENDPOINT or the offline cache; the simulator never
    reaches the internet). A failed download leaves the path as it was, so it is then not found."""
    if os.path.isabs(path):
        return mounted(path, env)
    if path.startswith("~"):
        return os.path.expanduser(path)
    if os.path.exists(path):
        return os.path.abspath(path)
    offline = env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not env.get("HF_ENDPOINT"):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    try:
        return snapshot_download(repo_id=path, local_files_only=offline, endpoint=env.get("HF_ENDPOINT") or None)
    except (HfHubHTTPError, HFValidationError):
        return path


def _header(file: Path) -> dict[str, list[int]]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterError("Error while deserializing header: HeaderTooSmall")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise AdapterError(f"Error while deserializing header: HeaderTooLarge ({size} bytes, the simulator "
                               f"reads at most {MAX_HEADER_BYTES})")
        header = f.read(size)
    try:
        parsed = json.loads(header)
        return {k: list(v["shape"]) for k, v in parsed.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise AdapterError(f"Error while deserializing header: InvalidHeaderDeserialization ({e})") from None


def read(name: str, path: str, env: Mapping[str, str]) -> AdapterFiles:
    """An adapter's files, in the order the worker reads them; AdapterNotFound or AdapterError in vLLM's words."""
    try:
        directory = resolve(path, env)
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: offline and not in the cache
        raise AdapterNotFound(name, path) from None
    except Exception as e:  # what else the download raises (the Hub unreachable...) is the load's failure message
        raise AdapterError(str(e)) from None
    try:
        with open(os.path.join(directory, "adapter_config.json"), "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise AdapterNotFound(name, path) from None
    except OSError as e:
        raise AdapterError(str(e)) from None
    if len(raw) > MAX_HEADER_BYTES:
        raise AdapterError(f"adapter_config.json is over the simulator's bound of {MAX_HEADER_BYTES} bytes")
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if isinstance(config, list):  # what PEFTHelper's first write into it raises
        raise AdapterError("list indices must be integers or slices, not str")
    if not isinstance(config, dict):
        raise AdapterError(f"'{type(config).__name__}' object does not support item assignment")
    for file_name in TENSOR_FILES:
        file = Path(directory, file_name)
        if file.is_file():
            try:
                tensors = _header(file) if file.suffix == ".safetensors" else None
                return AdapterFiles(directory, config, file_name, tensors, file.stat().st_size)
            except OSError as e:
                raise AdapterError(str(e)) from None
    return AdapterFiles(directory, config, None, None, 0)


# --- checking (pure) --------------------------------------------------------------------------------------------

def _set_repr(items) -> str:
    return "{" + ", ".join(repr(i) for i in sorted(items)) + "}"


def check_config(config: dict, max_lora_rank: int) -> int:
    """PEFTHelper.from_dict and validate_legal: the adapter's largest rank, or AdapterError with vLLM's message."""
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise AdapterError(f"Missing required configuration fields: {_set_repr(missing)}")
    rank = config["r"]
    if not isinstance(rank, (int, float)):
        raise AdapterError(f"'<=' not supported between instances of '{type(rank).__name__}' and 'int'")
    if rank <= 0:
        raise AdapterError(f"LoRA rank `r` must be a positive integer, got {rank}.")
    patterns = config.get("rank_pattern") or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"'{type(patterns).__name__}' object has no attribute 'items'")
    for key, value in patterns.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"LoRA rank for `{key}` in `rank_pattern` must be a positive integer, got {value}.")
    largest = max([rank, *patterns.values()])
    errors = _unsupported_features(config)
    if largest > max_lora_rank:
        errors.append(f"LoRA rank {largest} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise AdapterError(" ".join(errors))
    return largest


def _unsupported_features(config: dict) -> list[str]:
    errors = []
    unsupported = [m for m in config.get("modules_to_save") or () if m not in ("classifier", "score")]
    if unsupported:
        errors.append('vLLM only supports modules_to_save being either None or ["classifier", "score"] for '
                      f"classification models. Unsupported modules_to_save: {unsupported}")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in INITS_SUPPORTED:
        errors.append(f"vLLM does not support init_lora_weights={init!r}. Inits such as PiSSA, OLoRA, CorDA and "
                      "LoftQ modify the base model weights when PEFT loads the adapter. Convert it to a regular LoRA "
                      "adapter with PEFT's path_initial_model_for_weight_conversion, or set init_lora_weights to "
                      "true if the served base model already contains the modified weights.")
    for key, message in (("alora_invocation_tokens", "vLLM does not support Activated LoRA (aLoRA)."),
                         ("layer_replication", "vLLM does not support layer_replication."),
                         ("use_bdlora", "vLLM does not support block-diagonal LoRA (BD-LoRA)."),
                         ("use_qalora", "vLLM does not support QALoRA.")):
        if config.get(key):
            errors.append(message)
    return errors


def lora_module(tensor: str) -> tuple[str, bool]:
    """vLLM's parse_fine_tuned_lora_name: (module name, is lora_A) of a tensor, or AdapterError."""
    name = tensor.removeprefix("base_model.model.")
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2] == "lora_A"
    if len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in ("score", "classifier"):
        return parts[-2], False
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1] == "lora_embedding_A"
    raise AdapterError(f"{tensor} is unsupported LoRA weight")


def check_tensors(directory: str, tensors: dict[str, list[int]], config: dict, base: BaseLayers | None) -> None:
    """from_local_checkpoint's module check, then what activating it copies into the GPU slots: a tensor wider than
    the base's layer is torch's size mismatch (a narrower one loads, as on vLLM). No base facts: names only."""
    keep = set(config.get("modules_to_save") or ())
    modules: dict[str, dict[bool, list[int]]] = {}
    unexpected = []
    for tensor, shape in sorted(tensors.items()):  # safetensors lists a file's tensors by name
        if tensor.endswith(EMBEDDING_SUFFIXES) or "base_layer" in tensor:
            continue
        module, is_a = lora_module(tensor)
        if module.rsplit(".", 1)[-1] not in BaseLayers.MODULES and module.rsplit(".", 1)[-1] not in keep:
            unexpected.append(module)
        modules.setdefault(module, {})[is_a] = shape
    if unexpected:
        raise AdapterError(f"While loading {directory}, expected target modules in {_set_repr(BaseLayers.MODULES)} "
                           f"but received {unexpected}. Please verify that the loaded LoRA module is correct")
    if base is None:
        return
    # activation walks the base model's layers in order (q, k, v of qkv_proj, o_proj, gate and up, down_proj),
    # copying each slice's A then B; layers past the base's are never looked up
    placed = sorted((int(m.group(1)), BaseLayers.MODULES.index(m.group(2)), module)
                    for module in modules if (m := LAYER_MODULE.search(module)) and int(m.group(1)) < base.layers)
    for _, kind, module in placed:
        in_features, out_features = base.dims(BaseLayers.MODULES[kind])
        for is_a, dim, size in ((True, 1, in_features), (False, 0, out_features)):
            found = modules[module].get(is_a)
            if found and len(found) == 2 and found[dim] > size:
                raise AdapterError(f"The size of tensor a ({size}) must match the size of tensor b ({found[dim]}) "
                                   f"at non-singleton dimension {dim}")


def check(files: AdapterFiles, *, max_lora_rank: int, base: BaseLayers | None) -> int:
    """The whole of vLLM's load after reading: the config's rank and features, then the tensors. The rank."""
    rank = check_config(files.config, max_lora_rank)
    if files.tensor_file is None:
        raise AdapterError(f"{files.directory} doesn't contain tensors")
    if files.tensors is not None:
        check_tensors(files.directory, files.tensors, files.config, base)
    return rank

