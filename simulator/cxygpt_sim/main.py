"""`cxygpt-sim [serve] MODEL [vLLM flags]`: log the derived setup and serve until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from aiohttp import web

from .adapters import AdapterError
from .config import ConfigError, SimConfig, parse_config
from .models import Adapter, load_error, read_adapter
from .server import create_app
from .weights import WeightsError, load

log = logging.getLogger("cxygpt_sim")


def describe(config: SimConfig) -> list[str]:
    return [
        f"serving {config.model} as {', '.join(config.served_model_names)} on {config.host}:{config.port}",
        f"max-model-len {config.max_model_len}, max-num-seqs {config.max_num_seqs}, max-num-batched-tokens "
        f"{config.max_num_batched_tokens}, prefix caching {'on' if config.enable_prefix_caching else 'off'}",
        f"KV budget {config.kv_tokens} tokens ({config.capacity.kv_blocks} blocks of {config.block_size}): "
        f"{config.kv_explanation}",
        f"speed profile {config.speed_profile}: {config.speed.describe()}, seed {config.seed}, text {config.text}",
    ] + ([f"LoRA: max-loras {config.lora.max_loras}, max-lora-rank {config.lora.max_lora_rank}, max-cpu-loras "
          f"{config.lora.max_cpu_loras}, adapters read at {config.lora.load_gib_per_s:g} GiB/s, a step with adapters "
          f"{config.lora.step_overhead:g} longer, runtime load/unload "
          f"{'on' if config.runtime_lora_updating else 'off'}"] if config.lora else [])


def static_adapters(config: SimConfig) -> list[Adapter]:
    """--lora-modules loaded as vLLM loads them before it serves (each read at the adapter rate); the first that
    fails stops the start with the message its load would answer."""
    loaded: dict[str, Adapter] = {}
    for i, module in enumerate(config.lora_modules, start=1):
        if module.name in config.served_model_names:
            raise ConfigError(f"The lora adapter '{module.name}' conflicts with a served base model.")
        if module.name in loaded:
            raise ConfigError(f"The lora adapter '{module.name}' has already been loaded. If you want to load the "
                              "adapter in place, set 'load_inplace' to True.")
        try:
            lora = read_adapter(config, i, module.name, module.path, os.environ)
        except AdapterError as e:
            raise ConfigError(load_error(e).message) from None
        time.sleep(lora.load_s)
        parent = module.base_model_name if module.base_model_name in config.served_model_names \
            else config.served_name
        loaded[module.name] = Adapter(module.name, module.path, parent, lora)
        log.info("Loaded new LoRA adapter: name '%s', path '%s'", module.name, module.path)
    return list(loaded.values())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, ignored = parse_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        sys.exit(f"cxygpt-sim: error: {e}")
    if ignored:
        log.warning("ignoring vLLM flags the simulator does not model: %s", " ".join(ignored))
    for line in describe(config):
        log.info(line)
    try:  # as vLLM: the weights first (downloaded if need be), the API server after
        loaded = load(config.model, config.revision, config.load_gib_per_s)
    except WeightsError as e:
        sys.exit(f"cxygpt-sim: error: {e}")
    log.info(loaded.describe())
    if config.load_s:  # the rest of an engine's start (vLLM: CUDA graphs, warm-up), on top of the weights
        log.info("starting the engine: %g s before the server listens", config.load_s)
        time.sleep(config.load_s)
    try:
        adapters = static_adapters(config)
    except ConfigError as e:
        sys.exit(f"cxygpt-sim: error: {e}")
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass  # the standard loop is only slower
    # handler_cancellation: a client that disconnects cancels its handler, which frees the engine slot.
    # aiohttp reads a shutdown timeout of 0 as "wait forever"; vLLM's 0 means abort in-flight requests.
    web.run_app(create_app(config, adapters), host=config.host, port=config.port, access_log=None,
                handler_cancellation=True, shutdown_timeout=max(config.shutdown_timeout, 0.01), print=None)


if __name__ == "__main__":
    main()
