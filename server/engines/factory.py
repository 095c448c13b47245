"""Building an engine: the typed `EngineConfig` (made from ServerConfig), the startup checks, `make_engine`.

Contract:
- `EngineConfig.from_server_config(config)` resolves what the server's flags leave open (the embedded default
  model, converted once into the cache; the served name; the adapted targets) into one frozen, typed value.
  Engines never see ServerConfig; the API layer never builds an engine itself.
- `check_startup(cfg)` runs before the server binds its port: the model folder exists and holds a model
  (config.json), an experts folder that was asked for exists, and every expert file in it loads and fits the
  base (the same `load_experts` check the engine repeats at start, with the singular values from the factor
  cache, made here if missing, for the rescale check). A failure raises `StartupError` (or
  ExpertError, naming the file and tensor): `t2 serve` prints it as one line and exits non-zero.
- `make_engine(cfg)` builds the engine the config names (its constructor does no model work; `start()` does).
  `import vllm` happens only on the `vllm` path (server/engines/vllm.py); the engine's constructor checks the
  vLLM settings, the pass-through engine arguments included, so a bad one is a startup error too.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from server.engines.base import Engine

T = TypeVar("T")

if TYPE_CHECKING:
    from server.config import ServerConfig


class EngineKind(str, enum.Enum):
    HF = "hf"          # the embedded transformers engine (server/engines/hf.py)
    VLLM = "vllm"      # vLLM's AsyncLLM (server/engines/vllm.py)


class StartupError(Exception):
    """A setting or file that keeps the server from starting; its message is the one line the CLI prints."""


def in_own_thread(fn: Callable[[], T]) -> T:
    """fn() in a thread that ends with it; its result, or its exception re-raised here.

    Why: on a CPU, torch's intra-op parallelism is an OpenMP thread pool owned by the thread that first ran a
    parallel region, and it lives as long as that thread. With a second pool alive (say, the main thread's,
    from converting the default model or computing factors at startup), libgomp has more threads than cores
    and stops spinning between regions, so every one of the engine's ~1,500 regions a step pays a futex
    wake-up: the engine ran 1.4-1.6x slower here. Startup model work therefore runs in a thread that exits
    (its pool goes with it), and the embedded engine does all of its own in its worker thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="t2-startup")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM's parallelism and memory settings (issue 11), each one `t2 serve` flag; see ServerConfig."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None   # None: in-process for one rank, else vLLM's choice
    max_model_len: int | None = None                  # None: the model's own (max_position_embeddings)
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool | None = None                 # None: eager on a CPU, CUDA graphs on a GPU
    engine_args: Mapping[str, Any] = field(default_factory=dict)   # further AsyncEngineArgs, checked
    max_loras: int = 16                               # most distinct adaptations in one batch (issue 10)


@dataclass(frozen=True)
class EngineConfig:
    kind: EngineKind
    model_dir: Path
    name: str                                     # the base's model id in the API
    experts_dir: Path | None
    experts_required: bool = False                # the folder was asked for (--experts): it must exist
    device: str = "auto"
    dtype: str = "auto"
    targets: tuple[str, ...] = ()                 # adapted matrix kinds (experts.svd *_TARGETS)
    cache_dir: Path = Path(".cache/t2")
    max_batch: int = 8
    max_wait_ms: float = 500.0
    max_queue: int = 1024
    patch_cache_mb: int = 1024
    json_any_whitespace: bool = False             # structured outputs: free whitespace in constrained JSON
    max_adaptations: int = 32                     # gain slots of the embedded engine (mixed batches)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    @classmethod
    def from_server_config(cls, config: "ServerConfig") -> "EngineConfig":
        from experts.svd import ATTENTION_TARGETS, MLP_TARGETS
        from server.default_model import DEFAULT_MODEL_NAME, default_experts_dir, ensure_default_model

        cache = config.resolved_cache_dir()
        if config.model is None:
            model_dir, name = ensure_default_model(cache), config.served_model_name or DEFAULT_MODEL_NAME
            experts_dir = config.experts or default_experts_dir()
        else:
            if not Path(config.model).is_dir():      # before anything reads it (transformers would take it
                raise StartupError(f"--model {config.model}: no such folder")   # for a hub repo id)
            model_dir, name = Path(config.model), config.served_model_name or Path(config.model).name
            experts_dir = config.experts
        return cls(
            kind=EngineKind(config.engine), model_dir=model_dir, name=name, experts_dir=experts_dir,
            experts_required=config.experts is not None, device=config.device, dtype=config.dtype,
            targets=MLP_TARGETS + (ATTENTION_TARGETS if config.attention else ()), cache_dir=cache,
            max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
            patch_cache_mb=config.patch_cache_mb, json_any_whitespace=config.json_any_whitespace,
            max_adaptations=config.max_adaptations,
            vllm=VLLMOptions(
                tensor_parallel_size=config.tensor_parallel_size,
                pipeline_parallel_size=config.pipeline_parallel_size,
                distributed_executor_backend=(None if config.distributed_executor_backend == "auto"
                                              else config.distributed_executor_backend),
                max_model_len=config.max_model_len, gpu_memory_utilization=config.gpu_memory_utilization,
                enforce_eager=config.enforce_eager, engine_args=dict(config.vllm_engine_args),
                max_loras=config.max_loras))

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every engine's constructor takes."""
        return dict(name=self.name, experts_dir=self.experts_dir, device=self.device, dtype=self.dtype,
                    targets=self.targets, cache_dir=self.cache_dir, max_batch=self.max_batch,
                    max_wait_ms=self.max_wait_ms, max_queue=self.max_queue, patch_cache_mb=self.patch_cache_mb,
                    json_any_whitespace=self.json_any_whitespace)


def check_startup(cfg: EngineConfig) -> None:
    """The checks `t2 serve` runs before it binds the port (see the contract); raises on the first failure."""
    from experts.svd import model_fingerprint, model_ranks, safetensors_files
    from server.engines.common import load_experts

    # 1. the model folder
    if not cfg.model_dir.is_dir():
        raise StartupError(f"--model {cfg.model_dir}: no such folder")
    if not (cfg.model_dir / "config.json").is_file():
        raise StartupError(f"--model {cfg.model_dir}: not a Hugging Face model folder (no config.json)")
    safetensors_files(cfg.model_dir)            # FactorCacheError (an ExpertError) when there are none
    if cfg.kind is EngineKind.HF:               # 1b. a layout the embedded engine's forward runs (no weights read)
        from server.engines.hf import check_layout
        check_layout(cfg.model_dir)
    # 2. the experts folder, when one was asked for
    if cfg.experts_dir is not None and not Path(cfg.experts_dir).is_dir():
        if cfg.experts_required:
            raise StartupError(f"--experts {cfg.experts_dir}: no such folder")
        return
    # 3. every expert file against the base: the engine's own check, with the singular values for the rescale
    #    check (the factor cache the engine uses: made here once if missing, then the engine only reads it)
    if cfg.experts_dir is not None and any(Path(cfg.experts_dir).glob("*.safetensors")):
        import torch

        from experts.svd import ensure_factors, read_spectra
        try:
            ranks, fingerprint = model_ranks(cfg.model_dir, cfg.targets), model_fingerprint(cfg.model_dir)
        except (OSError, ValueError, KeyError) as e:
            raise StartupError(f"--model {cfg.model_dir}: cannot read the checkpoint: {e}") from None
        load_experts(cfg.experts_dir, ranks, fingerprint, cfg.name)        # the cheap checks first, then c
        factors, _ = ensure_factors(cfg.model_dir, Path(cfg.cache_dir) / "factors" / cfg.model_dir.name, cfg.targets,
                                    device="cuda" if torch.cuda.is_available() else "cpu")
        load_experts(cfg.experts_dir, ranks, fingerprint, cfg.name, read_spectra(factors, ranks))


def make_engine(cfg: EngineConfig) -> Engine:
    """The engine `cfg` names, not started."""
    if cfg.kind is EngineKind.VLLM:
        from server.engines.vllm import VLLMEngine  # the only path that imports vllm
        o = cfg.vllm
        return VLLMEngine(cfg.model_dir, **cfg.engine_kwargs(), tensor_parallel_size=o.tensor_parallel_size,
                          pipeline_parallel_size=o.pipeline_parallel_size,
                          distributed_executor_backend=o.distributed_executor_backend,
                          max_model_len=o.max_model_len, gpu_memory_utilization=o.gpu_memory_utilization,
                          enforce_eager=o.enforce_eager, engine_args=o.engine_args, max_loras=o.max_loras)
    from server.engines.hf import HFEngine
    return HFEngine(cfg.model_dir, **cfg.engine_kwargs(), max_adaptations=cfg.max_adaptations)
