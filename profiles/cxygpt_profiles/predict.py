"""Predicted TTFT and TPOT of an engine at its concurrency (pure), and the profile limits checked against them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .fit import estimate_fit
from .gpus import GpuTable, default_gpus
from .roofline import StepShape, Workload
from .sizing import limits_for, size_engine
from .speed import SpeedTable, StepModel, default_speeds, step_model
from .table import Limits, ModelCatalog, ModelFacts, Profile, ProfileTable, facts_of


@dataclass(frozen=True)
class Prediction:
    """What a request sees on an engine that keeps `concurrency` such requests running: its first token after
    `ttft_ms`, then one every `tpot_ms`."""
    gpu: str
    source: str
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    tpot_ms: float
    prefill_bound: bool = False   # the prompts alone need every step: queued prompts wait longer than ttft_ms

    @property
    def request_ms(self) -> float:
        return self.ttft_ms + self.tpot_ms * max(self.output_tokens - 1, 0)

    def as_status(self) -> dict:
        """camelCase, as the CRD status carries it."""
        return {"gpu": self.gpu, "source": self.source, "concurrency": self.concurrency,
                "promptTokens": self.prompt_tokens, "outputTokens": self.output_tokens,
                "ttftMs": round(self.ttft_ms, 1), "tpotMs": round(self.tpot_ms, 2), "prefillBound": self.prefill_bound}

    def as_dict(self) -> dict:
        return asdict(self)


def steady_state(model: StepModel, *, concurrency: int, prompt: int, output: int,
                 budget: int) -> tuple[float, float, bool]:
    """(TTFT ms, TPOT ms, prefill-bound) of a closed loop: `concurrency` requests of `prompt` tokens in and
    `output` out, each followed at once by the next, arrivals spread out, on an engine with `budget` tokens per step
    (vLLM's chunked prefill: the running sequences' decode tokens first, a prompt in chunks of what is left).
    - TTFT: the request's dispatch, then the steps that carry its prompt beside the others decoding (no wait for
      other prompts).
    - TPOT: a decode step of all of them at their mean context, with the steps the others' prompts turn into
      prefill steps (about one prompt each while this request decodes) spread over its tokens.
    - Prefill-bound: the prompts need more steps than a request lives, so every step prefills (TPOT is such a
      step) and prompts queue behind each other: the TTFT a client sees grows with the queue, past this one."""
    others = concurrency - 1
    context = prompt + output / 2
    decode_context = round(others * context)
    room = max(budget - others, 1)
    chunks, done = [], 0
    while done < prompt:
        tokens = min(room, prompt - done)
        chunks.append(model.step_ms(StepShape(prefill=((tokens, done),), decode_count=others,
                                              decode_context=decode_context)))
        done += tokens
    ttft, mixed = model.dispatch_ms + sum(chunks), sum(chunks) / len(chunks)
    decode = model.step_ms(StepShape(decode_count=concurrency, decode_context=round(concurrency * context)))
    gaps = output - 1
    if gaps <= 0:
        return ttft, decode, False
    bound = concurrency * prompt / room > gaps + len(chunks)
    turned = min(others * gaps / (gaps + len(chunks)) * len(chunks), gaps)
    return ttft, ((gaps - turned) * decode + turned * mixed) / gaps, bound


def running(concurrency: int, max_num_seqs: int, kv_tokens: int, prompt: int, output: int) -> int:
    """The requests an engine runs at once: its slots, and no more full-length sequences than its KV cache holds."""
    return max(min(concurrency, max_num_seqs, kv_tokens // max(prompt + output, 1)), 1)


def predict_engine(profile: Profile, *, gpu: str, gpu_count: int, facts: ModelFacts, repo: str | None,
                   max_model_len: int, prompt: int, output: int, concurrency: int, consts,
                   gpus: GpuTable | None = None, speeds: SpeedTable | None = None) -> Prediction:
    """The profile's engine on `gpu_count` of `gpu`: its running requests of `prompt` tokens in and `output` out."""
    gpus = gpus or default_gpus()
    e = profile.engine
    workload = Workload(facts, profile.weights, e.kv_cache_dtype, gpu_count, consts)
    model = step_model(gpu, workload, repo, gpus=gpus, speeds=speeds)
    fit = estimate_fit(facts, weights=profile.weights, kv_cache_dtype=e.kv_cache_dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=e.gpu_memory_utilization, gpu_memory_mib=gpus.gpus[gpu].memory_mib,
                       gpu_count=gpu_count, consts=consts)
    n = running(concurrency, e.max_num_seqs, fit.kv_token_capacity, prompt, output)
    ttft, tpot, bound = steady_state(model, concurrency=n, prompt=prompt, output=output,
                                     budget=gpus.gpus[gpu].default_max_num_batched_tokens)
    return Prediction(gpu=gpu, source=model.source.split(":")[0], concurrency=n, prompt_tokens=prompt,
                      output_tokens=output, ttft_ms=ttft, tpot_ms=tpot, prefill_bound=bound)


def predict_profile(profile: Profile, *, gpu: str, gpu_count: int, facts: ModelFacts, repo: str | None,
                    max_model_len: int, consts, limits: Limits | None = None, gpus: GpuTable | None = None,
                    speeds: SpeedTable | None = None) -> Prediction:
    """At the profile's own concurrency and context: its gateway concurrency of its longest requests (the whole
    input limit in, the output limit out; `limits` when they are cut to the model's context)."""
    lim = limits or profile.limits
    prompt = min(lim.max_input_tokens, max_model_len - lim.max_output_tokens)
    return predict_engine(profile, gpu=gpu, gpu_count=gpu_count, facts=facts, repo=repo, max_model_len=max_model_len,
                          prompt=max(prompt, 1), output=lim.max_output_tokens, concurrency=lim.max_concurrency,
                          consts=consts, gpus=gpus, speeds=speeds)


def limit_problems(profile: Profile, p: Prediction) -> list[str]:
    """The profile's limits that its engine's own speed breaks: each would fire at the load it is sized for."""
    lim, problems = profile.limits, []
    where = (f"{profile.name} on {p.gpu}: at concurrency {p.concurrency} with {p.prompt_tokens} tokens in, "
             f"{p.output_tokens} out, the engine's own")
    if p.ttft_ms > lim.degrade.p95_ttft_ms:
        problems.append(f"{where} TTFT {p.ttft_ms:.0f} ms is above degrade.p95_ttft_ms {lim.degrade.p95_ttft_ms:g}")
    if p.ttft_ms > lim.timeouts.ttft_s * 1000:
        problems.append(f"{where} TTFT {p.ttft_ms:.0f} ms is above timeouts.ttft_s {lim.timeouts.ttft_s:g}")
    if p.request_ms > lim.timeouts.total_s * 1000:
        problems.append(f"{where} request time {p.request_ms / 1000:.1f} s is above timeouts.total_s "
                        f"{lim.timeouts.total_s:g}")
    return problems


def gpus_of(table: ProfileTable, profile: Profile, gpus: GpuTable) -> list[str]:
    """The GPUs a profile is for: at least its memory, and less than the next larger profile of its mode, its weights
    and its fewest GPUs asks for, where selection would take that one instead."""
    larger = [p.gpu.min_memory_mib for p in table.profiles
              if (p.mode, p.weights, p.gpu.min_count) == (profile.mode, profile.weights, profile.gpu.min_count)
              and p.gpu.min_memory_mib > profile.gpu.min_memory_mib]
    below = min(larger, default=float("inf"))
    return [key for key, gpu in gpus.gpus.items() if profile.gpu.min_memory_mib <= gpu.memory_mib < below]


def profile_predictions(table: ProfileTable, catalog: ModelCatalog, gpus: GpuTable | None = None,
                        speeds: SpeedTable | None = None):
    """(profile, catalogued model, prediction) for every profile on every GPU it is for, with every catalogued model
    that fits there, on the GPUs and at the context sizing gives it (a node of the profile's most GPUs)."""
    gpus, speeds = gpus or default_gpus(), speeds or default_speeds()
    for profile in table.profiles:
        for gpu_key in gpus_of(table, profile, gpus):
            for repo, entry in catalog.models.items():
                if profile.weights != "bf16" and profile.weights not in entry.variants:
                    continue
                facts = facts_of(entry)
                sized = size_engine(profile, facts, table.fit, memory_mib=gpus.gpus[gpu_key].memory_mib,
                                    available=profile.gpu.max_count)
                if sized.gpus is not None:
                    yield profile, repo, predict_profile(profile, gpu=gpu_key, gpu_count=sized.gpus, facts=facts,
                                                         repo=repo, max_model_len=sized.max_model_len,
                                                         consts=table.fit, gpus=gpus, speeds=speeds,
                                                         limits=limits_for(profile, sized.max_model_len))


def check_table(table: ProfileTable, catalog: ModelCatalog, gpus: GpuTable | None = None,
                speeds: SpeedTable | None = None) -> list[str]:
    """The limits that the engines' own TTFT and request time break, at each profile's concurrency and context."""
    return [f"{msg} ({repo})" for profile, repo, p in profile_predictions(table, catalog, gpus, speeds)
            for msg in limit_problems(profile, p)]
