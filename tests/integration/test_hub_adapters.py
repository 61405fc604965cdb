"""The dev cluster's local Hub serves LoRA adapter repositories to huggingface_hub's snapshot_download: the catalog's
two stand-ins of Qwen3-0.6B (made on first request) and an adapter written on disk, whole and as PEFT saves them."""
import json
import struct
import sys

import pytest
from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from cxygpt_dev.hub import ADAPTER_STAND_INS, make_adapter_repo
from harness import ServerProcess, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    make_adapter_repo(root, "team/qwen3-0.6b-legal-lora", base_model="Qwen/Qwen3-0.6B", rank=32,
                      target_modules=("gate_proj", "up_proj", "down_proj"))
    port = free_port()
    with ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(root), "--port", str(port),
                        "--catalog-stand-ins", "1"], port=port, log_path=root / "hub.log") as proc:
        yield proc


def header(file) -> dict:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def download(hub, tmp_path, repo_id: str):
    return snapshot_download(repo_id=repo_id, endpoint=hub.url, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("repo_id", sorted(ADAPTER_STAND_INS))
def test_the_stand_in_adapters_download_whole_with_their_bases_shapes(hub, tmp_path, repo_id):
    base, rank, alpha, targets = ADAPTER_STAND_INS[repo_id]
    path = download(hub, tmp_path, repo_id)
    config = json.loads(open(f"{path}/adapter_config.json").read())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"], config["target_modules"],
            config["peft_type"]) == (base, rank, alpha, list(targets), "LORA")
    tensors = {k: v for k, v in header(f"{path}/adapter_model.safetensors").items() if k != "__metadata__"}
    assert len(tensors) == 28 * len(targets) * 2  # Qwen3-0.6B's 28 layers, A and B of each target
    q_a, q_b = (tensors[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight"] for x in "AB")
    assert (q_a["shape"], q_b["shape"], q_a["dtype"]) == ([rank, 1024], [2048, rank], "BF16")
    end = max(t["data_offsets"][1] for t in tensors.values())
    with open(f"{path}/adapter_model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        assert len(f.read()) == size + end  # every tensor's bytes are there


def test_an_adapter_on_disk_downloads_and_an_unknown_one_is_the_hubs_404(hub, tmp_path):
    path = download(hub, tmp_path, "team/qwen3-0.6b-legal-lora")
    tensors = header(f"{path}/adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.27.mlp.down_proj.lora_A.weight"]["shape"] == [32, 3072]
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "cxygpt-demo/qwen3-0.6b-nothing-lora")
