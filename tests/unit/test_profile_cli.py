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
    assert "input 2560 tokens, output 512" in out.stdout and "no rate limit" in out.stdout
    assert ("vllm serve Qwen/Qwen3-14B --served-model-name qwen3-14b --host 0.0.0.0 --port 8000 --dtype bfloat16 "
            "--kv-cache-dtype fp8 --max-model-len 3072 --gpu-memory-utilization 0.95 --max-num-seqs 2 "
            "--tensor-parallel-size 1") in out.stdout


def test_json_for_machines():
    out = run("--gpu-memory", "81559", "--gpu-count", "4", "--json")
    data = json.loads(out.stdout)
    assert data["profile"] == "SRV_MULTI_80G" and data["gpu"]["count"] == 4
    assert data["command"][:3] == ["vllm", "serve", "Qwen/Qwen3-14B"]
    assert data["limits"]["rate_qps"] == 40 and data["fit"]["fits"] is True


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
    assert data["profile"] == "SRV_MULTI_80G" and data["gpu"] == {
        "memory_mib": 81559, "count": 2, "product": "NVIDIA H100 80GB HBM3"}
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
