"""`cxygpt-profile`: memory parsing, text and JSON output, nvidia-smi discovery and its absence."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxygpt_profiles.cli import parse_memory_mib

EXE = str(Path(sys.executable).parent / "cxygpt-profile")


def run(*args, env=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("text, mib", [("32GiB", 32768), ("32G", 32768), ("80GB", 81920), ("81559", 81559),
                                       ("24576MiB", 24576), ("1.5g", 1536)])
def test_memory_sizes(text, mib):
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["lots", "-3G", "0", "32TB"])
def test_bad_memory_sizes_say_what_to_write(text):
    with pytest.raises(Exception, match="GPU memory"):
        parse_memory_mib(text)


def test_single_user_on_32gib_prints_profile_limits_and_command():
    out = run("--gpu-memory", "32GiB", "--mode", "single")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("profile   SINGLE_32G (single-user)")
    # 32 GiB, a bf16 KV cache: 5120 tokens of context beside Qwen3-14B's weights
    assert "input 4608 tokens, output 512" in out.stdout and "no rate limit" in out.stdout
    assert ("vllm serve Qwen/Qwen3-14B --served-model-name qwen3-14b --host 0.0.0.0 --port 8000 --dtype bfloat16 "
            "--kv-cache-dtype auto --max-model-len 5120 --gpu-memory-utilization 0.95 --max-num-seqs 2 "
            "--tensor-parallel-size 1") in out.stdout
    assert "sizing    1 of 1 GPU: 1 GPU holds 28169 MiB of bf16 weights" in out.stdout
    assert "context 5120 tokens, what the KV cache holds for one sequence of it" in out.stdout


def test_json_for_machines():
    out = run("--gpu-memory", "81559", "--gpu-count", "4", "--json")
    data = json.loads(out.stdout)
    assert data["profile"] == "SRV_80G" and data["gpu"]["count"] == 1  # 14B needs one of the four
    assert data["command"][:3] == ["vllm", "serve", "Qwen/Qwen3-14B"]
    assert data["limits"]["rate_qps"] == 20 and data["fit"]["fits"] is True
    assert data["sizing"]["gpus"] == 1 and data["sizing"]["available"] == 4
    data = json.loads(run("--gpu-memory", "81559", "--gpu-count", "8", "--json", "--model", "llama-3.1-70b").stdout)
    assert (data["profile"], data["gpu"]["count"]) == ("SRV_MULTI_80G", 2)
    assert "--tensor-parallel-size 2" in " ".join(data["command"])
    assert [(e["gpus"], e["fits"]) for e in data["sizing"]["estimates"]][:3] == [(2, True), (3, False), (4, True)]


def test_the_text_lists_the_estimate_for_each_gpu_count():
    out = run("--gpu-type", "h100-80g", "--gpu-count", "2", "--mode", "single", "--model", "Qwen/Qwen3-14B")
    lines = out.stdout.splitlines()
    sizing = next(i for i, line in enumerate(lines) if line.startswith("sizing"))
    assert lines[sizing].startswith("sizing    1 of 2 GPUs: 1 GPU holds 28169 MiB")
    assert "context 40960 tokens, the model's own maximum" in lines[sizing]
    assert lines[sizing + 1].startswith("  1 GPU   chosen  28169 MiB weights")
    assert lines[sizing + 2].startswith("  2 GPUs  fits    28169 MiB weights")


def test_int4_profile_uses_the_variant():
    data = json.loads(run("--gpu-memory", "32607", "--json").stdout)
    assert data["profile"] == "DEV_32G" and data["model"] == "Qwen/Qwen3-14B-GPTQ-Int4"


def test_nothing_fits_is_an_error_with_the_reason():
    out = run("--gpu-memory", "16GiB")
    assert out.returncode == 1 and "NoMatchingGPU" in out.stderr


def test_without_nvidia_smi_it_says_to_pass_the_memory(tmp_path):
    out = run(env={"PATH": str(tmp_path)})
    assert out.returncode != 0
    assert "nvidia-smi not found" in out.stderr and "--gpu-memory" in out.stderr


def test_reads_nvidia_smi_when_present(tmp_path):
    # a stand-in for the driver's tool on a machine without GPUs: same query, same CSV output
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n"
                   "[ \"$1\" = --query-gpu=memory.total,name ] || exit 9\n"
                   "printf '81559, NVIDIA H100 80GB HBM3\\n81559, NVIDIA H100 80GB HBM3\\n'\n")
    smi.chmod(0o755)
    data = json.loads(run("--json", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"}).stdout)
    assert data["profile"] == "SRV_80G" and data["gpu"] == {
        "memory_mib": 81559, "count": 1, "product": "NVIDIA H100 80GB HBM3"}
    assert data["sizing"]["available"] == 2
    # nvidia-smi's name is the GPU's product: the speed is predicted for two H100s
    assert data["predicted"]["gpu"] == "h100-80g" and data["predicted"]["source"] == "silicon"


def test_the_predicted_speed_at_the_profiles_concurrency_and_context():
    out = run("--gpu-type", "h100-80g", "--model", "Qwen/Qwen3-14B")
    assert out.returncode == 0, out.stderr
    assert "gpu       1 x 81559 MiB NVIDIA-H100-80GB-HBM3" in out.stdout
    speed = next(line for line in out.stdout.splitlines() if line.startswith("speed"))
    assert "running, 16128 tokens in, 256 out (h100-80g: silicon)" in speed and "TTFT" in speed and "TPOT" in speed
    data = json.loads(run("--gpu-type", "NVIDIA-GeForce-RTX-5090", "--json").stdout)
    assert data["profile"] == "DEV_32G" and data["predicted"]["source"] == "fitted"
    assert data["predicted"]["ttft_ms"] <= data["limits"]["degrade"]["p95_ttft_ms"]
    # memory alone does not say which GPU it is
    assert "speed     not predicted: which GPU is not known (--gpu-type h100-80g|" in run("--gpu-memory", "80G").stdout
    out = run("--gpu-type", "v100")
    assert out.returncode == 2 and "--gpu-type 'v100': not one of h100-80g" in out.stderr


def test_lora_adds_the_operators_flags_and_counts_the_slots_in_the_fit():
    plain = json.loads(run("--gpu-type", "h100-80g", "--json").stdout)
    lora = json.loads(run("--gpu-type", "h100-80g", "--lora", "--json").stdout)
    ranked = json.loads(run("--gpu-type", "h100-80g", "--max-lora-rank", "64", "--max-loras", "2", "--json").stdout)
    assert lora["engine_args"][-7:] == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16",
                                        "--max-cpu-loras", "16"]
    assert ranked["engine_args"][-7:] == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "64",
                                          "--max-cpu-loras", "16"]
    assert lora["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} and plain["env"] == {} and not plain["lora"]
    # the slots come out of the KV cache: 4 of rank 16 on Qwen3-14B, as the simulator and vLLM allocate them
    assert lora["fit"]["lora_mib"] == lora["lora"]["slots_mib"] == 490
    assert plain["fit"]["kv_cache_mib"] - lora["fit"]["kv_cache_mib"] == 490
    text = run("--gpu-type", "h100-80g", "--lora").stdout
    assert "lora      4 adapters in a batch, rank at most 16" in text
    assert "  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve Qwen/Qwen3-14B" in text
    refused = run("--gpu-type", "h100-80g", "--max-lora-rank", "63")
    assert refused.returncode == 2 and "invalid choice: 63" in refused.stderr
