"""Regenerates profiles/speeds.json: vLLM's step times for the catalog's models from NVIDIA AIConfigurator.

AIConfigurator (https://github.com/ai-dynamo/aiconfigurator) composes a forward pass from operator timings measured
on each GPU for vLLM (its "silicon" database). This script asks it, offline, for every catalogued model on every
GPU of profiles/gpus.yaml that it covers (`speed.source: silicon`), at every tensor-parallel size the model fits,
for each KV-cache layout the database has, what the simulator needs: the linear layers of a step over N tokens,
the attention of a decode step (batch x context) and of a prefill chunk (length x tokens before it). It fits the
roofline efficiencies of every GPU (profiles/cxygpt_profiles/speed.py, `Roofline`), and records AIConfigurator's
own end-to-end estimates for the shapes BENCHMARKS.md compares against. It is a development tool, never a
dependency of the simulator:

    python -m venv .venv-speeds && .venv-speeds/bin/pip install -e '.[speeds]'
    .venv-speeds/bin/python scripts/gen_speeds.py          # ~15 min on 2 cores; writes profiles/speeds.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
import tempfile
import time
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import yaml

from cxygpt_profiles import default_catalog
from cxygpt_profiles.gpus import default_gpus
from cxygpt_profiles.roofline import StepShape, Workload, decode_step, prefill_step, step_bytes, step_flops
from cxygpt_profiles.speed import AttentionTable, Grids, Roofline, SiliconSpeed, SiliconTable, SpeedTable
from cxygpt_profiles.table import parse_table

BACKEND = "vllm"
GRIDS = Grids(decode_batch=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
              decode_context=[128, 1024, 4096, 16384, 65536],
              prefill_tokens=[1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
              prefill_before=[0, 2048, 8192, 32768])
KV_LAYOUTS = ("bfloat16", "fp8")
# the profiles run an fp8 KV cache, on several GPUs too; the simulator's default (auto) is bf16, on one GPU: with
# tensor parallelism only fp8 is measured (bf16 on an A100, which has no fp8)
MULTI_GPU_KV_LAYOUTS = ("fp8", "bfloat16")
TP_SIZES = (1, 2, 4, 8)
DISPATCH_PROMPT = 1024         # the one request whose estimate, less its prefill, is the dispatch time
MAX_TP_BY_MEMORY = 70 * 1024   # tensor parallel only where a profile takes several GPUs: 80 GB-class cards
# AIConfigurator's aggregated-serving estimates recorded for comparison: the Qwen3-14B shape, and the
# shapes of the published vLLM figures in BENCHMARKS.md ("Simulator calibration")
ESTIMATES = [("h100-80g", "Qwen/Qwen3-14B", 2000, 256, b) for b in (1, 8, 32)] + [
    ("h100-80g", "meta-llama/Llama-3.1-8B-Instruct", 32, 128, 8),
    *[("h100-80g", "meta-llama/Llama-3.1-8B-Instruct", 128, 128, c) for c in (1, 4, 16)],
    ("a100-80g", "meta-llama/Llama-3.1-8B-Instruct", 32, 128, 8),
    *[("a100-80g", "meta-llama/Llama-3.1-8B-Instruct", 1024, 128, c) for c in (1, 8)],
]
# off-grid shapes at which the interpolated table is checked against AIConfigurator itself
CHECKS = [decode_step(24, 3000), decode_step(3, 700), decode_step(96, 12000), prefill_step(700),
          prefill_step(3000, 5000), prefill_step(1500, 20000)]
log = logging.getLogger("gen_speeds")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("aiconfigurator", "aiconfigurator_core"):
        logging.getLogger(name).setLevel(logging.ERROR)


def config_json(entry) -> dict:
    """The model's config.json as AIConfigurator reads it, from the catalog's facts. Mistral-7B-v0.3 has no
    sliding window: its layers are Llama's, which AIConfigurator models (it does not name MistralForCausalLM)."""
    arch = "LlamaForCausalLM" if entry.architecture == "MistralForCausalLM" else entry.architecture
    return {"architectures": [arch], "num_hidden_layers": entry.layers, "hidden_size": entry.hidden_size,
            "intermediate_size": entry.intermediate_size, "num_attention_heads": entry.attention_heads,
            "num_key_value_heads": entry.kv_heads, "head_dim": entry.head_dim, "vocab_size": entry.vocab_size,
            "max_position_embeddings": entry.max_context, "tie_word_embeddings": entry.tied_embeddings,
            "torch_dtype": "bfloat16"}


class Aic:
    """AIConfigurator's public single-point estimate (aiconfigurator.cli.api.cli_estimate), one system."""

    def __init__(self, system: str):
        from aiconfigurator.cli.api import cli_estimate
        from aiconfigurator.sdk.errors import PerfDataNotAvailableError
        self.estimate, self.missing, self.system = cli_estimate, PerfDataNotAvailableError, system
        # the version the database answers for vLLM on this system (resolving it is slow: once)
        self.version = self._run("Qwen/Qwen3-0.6B", "static_gen", batch_size=1, isl=128, osl=2,
                                 backend_version=None).backend_version

    def _run(self, model_dir: str, mode: str, **kw):
        kw.setdefault("backend_version", getattr(self, "version", None))
        return self.estimate(model_dir, self.system, mode=mode, backend_name=BACKEND, **kw)

    def decode(self, model_dir: str, tp: int, kv: str, batch: int, context: int) -> tuple[float, float]:
        """(linear, attention) ms of one decode step: osl 2 is one step at context `isl`."""
        ops = self._run(model_dir, "static_gen", batch_size=batch, isl=context, osl=2, tp_size=tp,
                        kvcache_quant_mode=kv).summary.get_generation_latency_dict()
        attention = ops.pop("generation_attention")
        return sum(ops.values()), attention

    def prefill(self, model_dir: str, tp: int, kv: str, tokens: int, before: int) -> tuple[float, float]:
        """(linear, attention) ms of one sequence's prefill of `tokens` after `before` cached ones."""
        ops = self._run(model_dir, "static_ctx", batch_size=1, isl=before + tokens, osl=1, prefix=before,
                        tp_size=tp, kvcache_quant_mode=kv).summary.get_context_latency_dict()
        attention = ops.pop("context_attention")
        return sum(ops.values()), attention

    def agg(self, model_dir: str, kv: str, prompt: int, output: int, batch: int, tp: int = 1):
        return self._run(model_dir, "agg", batch_size=batch, isl=prompt, osl=output, kvcache_quant_mode=kv, tp_size=tp)

    def dispatch(self, model_dir: str, tp: int, kv: str) -> float:
        """What its estimate of one request adds to the request's prefill: vLLM's CPU dispatch, not in kernel
        timings (its vLLM backend charges it per layer)."""
        alone = self._run(model_dir, "static_ctx", batch_size=1, isl=DISPATCH_PROMPT, osl=1, tp_size=tp,
                          kvcache_quant_mode=kv).ttft
        return self.agg(model_dir, kv, DISPATCH_PROMPT, 2, 1, tp).ttft - alone


def build_table(aic: Aic, model_dir: str, tp: int) -> SiliconTable | None:
    attention, decode_linear, prefill_linear = {}, None, None
    g = GRIDS
    for kv in KV_LAYOUTS if tp == 1 else MULTI_GPU_KV_LAYOUTS:
        if tp > 1 and attention:
            break
        try:
            decode = [[aic.decode(model_dir, tp, kv, b, c) for c in g.decode_context] for b in g.decode_batch]
        except aic.missing as e:
            log.info("  %s: no %s KV data (%s)", aic.system, kv, str(e)[:100])
            continue
        prefill = [[aic.prefill(model_dir, tp, kv, t, before) for before in g.prefill_before]
                   for t in g.prefill_tokens]
        decode_linear = [row[0][0] for row in decode]
        prefill_linear = [row[0][0] for row in prefill]
        attention[kv] = AttentionTable(decode_ms=[[a for _, a in row] for row in decode],
                                       prefill_ms=[[a for _, a in row] for row in prefill])
    if not attention:
        return None
    kv = next(iter(attention))
    return SiliconTable(decode_linear_ms=decode_linear, prefill_linear_ms=prefill_linear, attention=attention,
                        dispatch_ms=aic.dispatch(model_dir, tp, kv))


def interpolation_error(aic: Aic, model_dir: str, tp: int, table: SiliconTable) -> float:
    """The largest relative difference between the interpolated table and AIConfigurator at off-grid shapes."""
    worst = 0.0
    for kv, attention in table.attention.items():
        speed = SiliconSpeed(table, attention, GRIDS, "check")
        for shape in CHECKS:
            if shape.prefill:
                (tokens, before), = shape.prefill
                direct = sum(aic.prefill(model_dir, tp, kv, tokens, before))
            else:
                direct = sum(aic.decode(model_dir, tp, kv, shape.decode_count,
                                        shape.decode_context // shape.decode_count))
            worst = max(worst, abs(speed.step_ms(shape) / direct - 1))
    return worst


def fits(weights_mib: float, tp: int, memory_mib: int) -> bool:
    """Room for the weights' shard, the engine's overhead and some KV cache at the profiles' utilisation."""
    return weights_mib / tp + 2048 + 1024 <= 0.92 * memory_mib


def samples(tables: dict[str, SiliconTable]) -> list[tuple[str, StepShape, float]]:
    """(repository, shape, AIConfigurator's ms) at the grid points: decode steps and prefill chunks."""
    out = []
    g = GRIDS
    for repo, table in tables.items():
        a = table.attention["bfloat16"]
        for i, b in enumerate(g.decode_batch):
            for j, c in enumerate(g.decode_context):
                out.append((repo, decode_step(b, c), table.decode_linear_ms[i] + a.decode_ms[i][j]))
        for i, t in enumerate(g.prefill_tokens):
            for j, before in enumerate(g.prefill_before):
                out.append((repo, prefill_step(t, before), table.prefill_linear_ms[i] + a.prefill_ms[i][j]))
    return out


def fit_roofline(points, workloads, bandwidth_gbs: float, peak_tflops: float, system: str,
                 dispatch_ms_per_layer: float) -> Roofline:
    """Efficiencies (at most 1) and a per-step overhead that best match the measured steps, by least squares on
    the log of the ratio (a grid search: the surface has a kink where memory and compute cross)."""
    memory = np.array([step_bytes(workloads[repo], s) for repo, s, _ in points]) / (bandwidth_gbs * 1e6)
    compute = np.array([step_flops(workloads[repo], s) for repo, s, _ in points]) / (peak_tflops * 1e9)
    actual = np.array([ms for *_, ms in points])
    best = None
    for overhead in np.arange(0.0, 6.01, 0.05):
        me = np.arange(0.30, 1.001, 0.01)[:, None, None]
        ce = np.arange(0.10, 1.001, 0.01)[None, :, None]
        pred = overhead + np.maximum(memory / me, compute / ce)
        err = np.mean(np.log(pred / actual) ** 2, axis=2)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        if best is None or err[i, j] < best[0]:
            best = (err[i, j], float(me[i, 0, 0]), float(ce[0, j, 0]), float(overhead))
    _, me_, ce_, overhead_ = best
    pred = overhead_ + np.maximum(memory / me_, compute / ce_)
    return Roofline(memory_efficiency=round(me_, 2), compute_efficiency=round(ce_, 2),
                    step_overhead_ms=round(overhead_, 2), dispatch_ms_per_layer=round(dispatch_ms_per_layer, 3),
                    fitted_on=system,
                    median_error=round(float(np.median(np.abs(pred / actual - 1))), 3))


def system_facts(system: str) -> tuple[float, float, int]:
    """(bandwidth GB/s, bf16 peak TFLOPS, memory MiB) as AIConfigurator's own system file states them."""
    gpu = yaml.safe_load((files("aiconfigurator_core") / "systems" / f"{system}.yaml").read_text())["gpu"]
    return gpu["mem_bw"] / 1e9, gpu["bfloat16_tc_flops"] / 1e12, int(gpu["mem_capacity"] / 2**20)


def dump(value, indent: str = "") -> str:
    """JSON with a row of numbers per line (a table reads, and diffs, by its rows); 4 significant digits."""
    if isinstance(value, float):
        return json.dumps(float(f"{value:.4g}"))
    if isinstance(value, dict):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + dump(v, inner) for v in value) + "\n" + indent + "]"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "profiles" / "speeds.json")
    ap.add_argument("--gpus", nargs="*", help="only these GPUs of profiles/gpus.yaml (default all)")
    ap.add_argument("--models", nargs="*", help="only these catalog models (default all)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet()
    began = time.monotonic()
    # the table as its schema has it: loading it checks its limits against the speeds this script makes
    gpus, catalog, consts = default_gpus(), default_catalog(), parse_table().fit
    models = {repo: e for repo, e in catalog.models.items() if not a.models or repo in a.models}
    chosen = {k: g for k, g in gpus.gpus.items() if not a.gpus or k in a.gpus}
    workdir = Path(tempfile.mkdtemp(prefix="gen-speeds-"))
    model_dirs = {}
    for repo, entry in models.items():
        d = workdir / repo.replace("/", "--")
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config_json(entry)))
        model_dirs[repo] = str(d)
    weights_mib = {repo: Workload(catalog.lookup(repo), "bf16", "auto", 1, consts).weight_bytes / 2**20
                   for repo in models}

    def tables_for(aic: Aic, memory_mib: int, tps) -> dict[str, dict[str, SiliconTable]]:
        out = {}
        for repo in models:
            for tp in tps:
                if not fits(weights_mib[repo], tp, memory_mib):
                    continue
                log.info("%s %s tp%d", aic.system, repo, tp)
                table = build_table(aic, model_dirs[repo], tp)
                if table:
                    out.setdefault(repo, {})[f"tp{tp}"] = table
        return out

    silicon, fitted, worst, aics = {}, {}, {}, {}
    for key, gpu in chosen.items():
        system = gpu.speed.aiconfigurator_system or gpu.speed.fitted_on
        aic = aics[system] = Aic(system)
        if gpu.speed.source == "silicon":
            tps = TP_SIZES if gpu.memory_mib >= MAX_TP_BY_MEMORY else (1,)
            tables = tables_for(aic, gpu.memory_mib, tps)
            silicon[key] = {"aiconfigurator_system": system, "database": f"{BACKEND} {aic.version}",
                            "models": tables}
            worst[key] = max(interpolation_error(aic, model_dirs[repo], int(tp[2:]), t)
                             for repo, by_tp in tables.items() for tp, t in by_tp.items())
            log.info("%s: interpolation within %.1f%% of AIConfigurator off the grid", key, 100 * worst[key])
            bandwidth, peak = gpu.memory_bandwidth_gbs, gpu.peak_tflops["bf16"]
        else:
            # fitted to the sibling's steps against the sibling's own facts, then applied to this GPU's
            bandwidth, peak, memory = system_facts(system)
            tables = tables_for(aic, memory, (1,))
        tp1 = {repo: by_tp["tp1"] for repo, by_tp in tables.items() if "tp1" in by_tp}
        workloads = {repo: Workload(catalog.lookup(repo), "bf16", "auto", 1, consts) for repo in tp1}
        per_layer = float(np.median([t.dispatch_ms / workloads[repo].facts.layers for repo, t in tp1.items()]))
        fitted[key] = fit_roofline(samples(tp1), workloads, bandwidth, peak, system, per_layer)
        log.info("%s: roofline %s", key, fitted[key])
    estimates = []
    for key, repo, prompt, output, batch in ESTIMATES:
        if key not in silicon or repo not in models:
            continue
        r = aics[silicon[key]["aiconfigurator_system"]].agg(model_dirs[repo], "bfloat16", prompt, output, batch)
        estimates.append({"gpu": key, "model": repo, "kv_cache_dtype": "auto", "prompt": prompt, "output": output,
                          "batch": batch, "ttft_ms": r.ttft, "tpot_ms": r.tpot})
    versions = {"aiconfigurator": importlib.metadata.version("aiconfigurator"),
                "aiconfigurator_core": importlib.metadata.version("aiconfigurator-core")}
    data = SpeedTable(
        generator={"script": "scripts/gen_speeds.py", **versions, "backend": BACKEND, "weights": "bf16",
                   "interpolation_max_error": ", ".join(f"{k} {v:.1%}" for k, v in worst.items())},
        grids=GRIDS, silicon=silicon, fitted=fitted, estimates=estimates)
    a.out.write_text(dump(data.model_dump(mode="json")) + "\n")
    log.info("wrote %s (%d bytes) in %.0f s", a.out, a.out.stat().st_size, time.monotonic() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
