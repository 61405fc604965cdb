"""`cxygpt-profile`: the profile, limits and exact vLLM command for this machine's (or a given) GPU."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys

from .engine import RUNTIME_LORA_ENV, engine_args, lora_args, lora_limits
from .gpus import default_gpus
from .load import load_table
from .select import AUTO, GpuNode, NoFit, Selection, select_profile
from .table import LORA_RANKS, ProfileTableError, load_catalog

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_memory_mib(text: str) -> int:
    """'32GiB', '32G', '32GB' (vendors' GB are GiB) → MiB; a bare number is MiB, as nvidia-smi prints."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read GPU memory {text!r}: use e.g. 32GiB, 80G or 81559 (MiB)")
    value, unit = float(m.group(1)), (m.group(2) or "mib").lower()
    mib = value * 1024 if unit in ("gib", "gb", "g") else value
    if mib <= 0:
        raise argparse.ArgumentTypeError("GPU memory must be positive")
    return int(mib)


def read_nvidia_smi() -> list[GpuNode]:
    """This machine's GPUs grouped as one node; an explanatory error when nvidia-smi is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        raise SystemExit("cxygpt-profile: nvidia-smi not found (no NVIDIA driver here): "
                         "pass --gpu-memory, e.g. --gpu-memory 32GiB")
    out = subprocess.run([exe, "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"cxygpt-profile: nvidia-smi failed: {out.stderr.strip() or 'no GPUs listed'}; "
                         "pass --gpu-memory instead")
    gpus = [line.split(",", 1) for line in out.stdout.strip().splitlines()]
    memory = min(int(float(mem)) for mem, _ in gpus)
    return [GpuNode(memory_mib=memory, count=len(gpus), name="nvidia-smi", product=gpus[0][1].strip())]


def describe(sel: Selection, model: str, served: str, port: int,
             lora: tuple[int, int, int] | None = None) -> dict:
    args = engine_args(sel, model=model, served_name=served, port=port) + (lora_args(lora) if lora else [])
    return {
        "profile": sel.profile.name,
        "description": sel.profile.description,
        "mode": sel.mode,
        "forced": sel.forced,
        "gpu": {"memory_mib": sel.node.memory_mib, "count": sel.gpu_count, "product": sel.node.product},
        "weights": sel.profile.weights,
        "model": model,
        "served_model_name": served,
        "engine_args": args,
        "command": ["vllm", "serve", *args],
        "env": {RUNTIME_LORA_ENV: "True"} if lora else {},
        "lora": {"max_loras": lora[0], "max_lora_rank": lora[1], "max_cpu_loras": lora[2],
                 "slots_mib": sel.fit.lora_mib if sel.fit else None} if lora else None,
        "limits": sel.limits.model_dump(),
        "fit": sel.fit.as_dict() if sel.fit else None,
        "sizing": {"gpus": sel.sizing.gpus, "available": sel.sizing.available, "reason": sel.sizing.reason,
                   "estimates": [{"gpus": e.gpus, "fits": e.fits, "max_model_len": e.max_model_len,
                                  "message": e.message} for e in sel.sizing.estimates]},
        "predicted": sel.prediction.as_dict() if sel.prediction else None,
        "notes": list(sel.notes),
    }


def render_text(d: dict) -> str:
    lim = d["limits"]
    rate = ("no rate limit" if lim["rate_qps"] is None and lim["rate_tpm"] is None
            else f"{lim['rate_qps']} QPS, {lim['rate_tpm']} tokens/min")
    lines = [
        f"profile   {d['profile']} ({d['mode']}-user{', forced' if d['forced'] else ''}): {d['description']}",
        f"gpu       {d['gpu']['count']} x {d['gpu']['memory_mib']} MiB {d['gpu']['product']}",
        f"weights   {d['weights']}: {d['model']}",
        f"limits    input {lim['max_input_tokens']} tokens, output {lim['max_output_tokens']} "
        f"(degraded {lim['degraded_max_output_tokens']}), {rate}, queue {lim['queue_size']}, "
        f"concurrency {lim['max_concurrency']}",
    ]
    sizing = d["sizing"]
    lines.append(f"sizing    {sizing['gpus']} of {sizing['available']} GPU{'s' * (sizing['available'] != 1)}: "
                 f"{sizing['reason']}")
    for e in sizing["estimates"]:
        mark = "chosen" if e["gpus"] == sizing["gpus"] else "fits" if e["fits"] else "no"
        lines.append(f"  {e['gpus']} GPU{'s' if e['gpus'] != 1 else ' '}  {mark:6}  {e['message']}")
    p = d["predicted"]
    if p:
        bound = "; prefill-bound: prompts queue for longer" if p["prefill_bound"] else ""
        lines.append(f"speed     TTFT {p['ttft_ms']:.0f} ms, TPOT {p['tpot_ms']:.1f} ms with {p['concurrency']} "
                     f"running, {p['prompt_tokens']} tokens in, {p['output_tokens']} out ({p['gpu']}: "
                     f"{p['source']}){bound}")
    else:
        product = d["gpu"]["product"]
        which = "which GPU is not known" if product == "unknown" else f"{product} is not in profiles/gpus.yaml"
        lines.append(f"speed     not predicted: {which} (--gpu-type {'|'.join(default_gpus().gpus)})")
    lora = d["lora"]
    if lora:
        lines.append(f"lora      {lora['max_loras']} adapters in a batch, rank at most {lora['max_lora_rank']}, "
                     f"{lora['max_cpu_loras']} in CPU memory; the slots take {lora['slots_mib']} MiB of the KV "
                     f"cache; adapters are loaded at runtime ({RUNTIME_LORA_ENV}=True)")
    lines += [f"note      {n}" for n in d["notes"]]
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in d["env"].items())
    lines += ["command", "  " + env + shlex.join(d["command"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxygpt-profile", description=__doc__)
    ap.add_argument("--gpu-memory", type=parse_memory_mib, help="memory per GPU (32GiB, 80G, 81559); "
                    "default: read from nvidia-smi")
    ap.add_argument("--gpu-type", help="the GPU, for the engine's predicted speed: one of profiles/gpus.yaml "
                    f"({', '.join(default_gpus().gpus)}) or its product name; its memory unless --gpu-memory "
                    "(default: nvidia-smi's)")
    ap.add_argument("--gpu-count", type=int, default=1, help="GPUs on the machine (default 1)")
    ap.add_argument("--mode", choices=["single", "multi"], default="multi", help="single-user quality or "
                    "multi-user throughput (default multi)")
    ap.add_argument("--profile", default=AUTO, help="force a profile by name (default auto)")
    ap.add_argument("--model", default="Qwen/Qwen3-14B", help="Hugging Face id or path (default Qwen/Qwen3-14B)")
    ap.add_argument("--int4", metavar="MODEL", help="4-bit variant to use for int4 profiles "
                    "(default: the catalog's variant of --model)")
    ap.add_argument("--served-model-name", help="OpenAI model name (default: the catalog alias or --model)")
    ap.add_argument("--port", type=int, default=None, help="engine port (default: the table's)")
    ap.add_argument("--lora", action="store_true", help="with LoRA adapters: the table's adapter slots (as "
                    "spec.adapters makes the operator derive them), counted in the fit")
    ap.add_argument("--max-loras", type=int, choices=range(1, 17), metavar="N", help="adapters in one batch "
                    "(spec.lora.maxLoras; implies --lora)")
    ap.add_argument("--max-lora-rank", type=int, choices=LORA_RANKS, metavar="R", help="the highest adapter rank "
                    f"(spec.lora.maxRank, one of {', '.join(map(str, LORA_RANKS))}; implies --lora)")
    ap.add_argument("--table", help="profiles.yaml to use")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args(argv)

    try:
        table, catalog = load_table(a.table), load_catalog()
    except ProfileTableError as e:
        print(f"cxygpt-profile: {e}", file=sys.stderr)
        return 2
    if a.gpu_count < 1:
        ap.error("--gpu-count must be at least 1")
    gpus = default_gpus()
    gpu = None
    if a.gpu_type:
        gpu = a.gpu_type if a.gpu_type in gpus.gpus else gpus.by_product(a.gpu_type)
        if gpu is None:
            ap.error(f"--gpu-type {a.gpu_type!r}: not one of {', '.join(gpus.gpus)} nor their product names")
    if gpu is not None:
        nodes = [GpuNode(memory_mib=a.gpu_memory or gpus.gpus[gpu].memory_mib, count=a.gpu_count, name="given",
                         product=gpus.gpus[gpu].products[0])]
    elif a.gpu_memory:
        nodes = [GpuNode(memory_mib=a.gpu_memory, count=a.gpu_count, name="given")]
    else:
        nodes = read_nvidia_smi()
    found = catalog.entry(a.model)
    facts = catalog.lookup(a.model)
    int4: str | None = a.int4 or (found[1].variants.get("int4") if found else None)
    variants = frozenset({"bf16", *(["int4"] if int4 else [])})
    served = a.served_model_name or (found[1].aliases[0] if found and found[1].aliases else a.model)
    lora = (lora_limits(table.lora, a.max_loras, a.max_lora_rank)
            if a.lora or a.max_loras or a.max_lora_rank else None)
    try:
        sel = select_profile(table, mode=a.mode, requested=a.profile, nodes=nodes, facts=facts, variants=variants,
                             lora_slots=lora[:2] if lora else None)
    except NoFit as e:
        print(f"cxygpt-profile: {e.reason}: {e.message}", file=sys.stderr)
        return 1
    model = int4 if sel.profile.weights == "int4" and int4 else a.model
    d = describe(sel, model, served, a.port or table.vllm.port, lora)
    print(json.dumps(d, indent=2) if a.json else render_text(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
