"""The one configuration object of the server.

Contract: every field of `ServerConfig` is one `t2 serve` flag (`--field-name`) and one environment
variable (`T2_FIELD_NAME`); the CLI is generated from these fields (server/cli.py), so the three can't
drift apart. Precedence: flag > environment > default. Values are validated here, once (the vLLM
pass-through `vllm_engine_args` here as a JSON object; its names and types against vLLM's AsyncEngineArgs
when the vLLM engine is built, before the port is bound). The vLLM-only settings are refused with
`--engine hf`, so a flag is never silently ignored. `EngineConfig.from_server_config` (server/engines/
factory.py) turns this into what an engine is built from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experts.dispatch import Strategy

ENV_PREFIX = "T2_"


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[Path] = Field(
        None, description="HF model folder (safetensors). Default: the embedded SmolLM2-135M-Instruct.")
    served_model_name: Optional[str] = Field(
        None, description="Model id of the base in the API. Default: the folder's name.")
    experts: Optional[Path] = Field(
        None, description="Folder of expert .safetensors files. Default: the experts shipped for the "
        "embedded model (none for other models).")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf (embedded transformers) or vllm.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (hf engine).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: auto = float32 on CPU, bfloat16 on GPU.")
    dispatch: Strategy = Field(
        Strategy.PROMPT, description="Default dispatch strategy for model 'auto': prompt | classifier | none.")
    attention: bool = Field(
        False, description="Also decompose and adapt the attention projections (q, k, v, o).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    cache_dir: Optional[Path] = Field(
        None, description="Cache of converted models and SVD factors. Default: $T2_CACHE_DIR or ~/.cache/t2.")
    max_batch: int = Field(8, ge=1, le=256, description="Most sequences in one batch.")
    max_wait_ms: float = Field(
        500.0, ge=0, description="Longest a request waits for a gain slot before younger requests stop "
        "being admitted ahead of it.")
    max_adaptations: int = Field(
        32, ge=1, le=4096, description="Most distinct adaptations live in one batch (gain slots, hf engine).")
    max_queue: int = Field(1024, ge=1, description="Most waiting sequences; beyond, requests get 429.")
    patch_cache_mb: int = Field(
        1024, ge=0, description="Memory for recently used patched weights (hot swaps are a copy).")
    max_loras: int = Field(
        16, ge=1, le=1024, description="vllm engine: most distinct adaptations in one batch (slots of gain rows; "
        "more wait a step, slots are recycled LRU).")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request sets none.")
    max_n: int = Field(8, ge=1, description="Largest n a request may ask for.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # ---- structured outputs and tools (server/api/tools.py, server/engines/structured.py) ----
    chat_template: Optional[str] = Field(
        None, description="Chat template: a Jinja file, or 'chatml-tools' (shipped, tool-aware ChatML). Default: "
        "the model's own; chatml-tools for the embedded default model.")
    tool_call_parser: Literal["hermes"] = Field(
        "hermes", description="How tool calls are read from free output (tool_choice auto), vLLM's names.")
    json_any_whitespace: bool = Field(
        False, description="Let constrained JSON have free whitespace; default compact (no newlines or runs).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (for log collectors).")
    # ---- security ----
    api_key: Optional[str] = Field(
        None, description="Require 'Authorization: Bearer KEY' on /v1 (off when unset).")
    admin_key: Optional[str] = Field(
        None, description="Enable the admin API (/admin: load/unload experts) with this Bearer key; off when unset.")
    admin_experts_dir: Optional[Path] = Field(
        None, description="The only folder the admin API loads experts from. Default: the experts folder.")
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed by CORS ('*' = any); empty = no CORS headers.")
    allowed_hosts: str = Field(
        "", description="Comma-separated Host names the server answers ('*.example.com' = its subdomains); "
        "others get a 400. Empty = any Host (set it when no API key is: it stops DNS rebinding).")
    # ---- limits ----
    max_body_bytes: int = Field(2 << 20, ge=1024, description="Largest request body; beyond, 413.")
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest max_tokens a request may ask for; beyond, 400.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Most /v1 generation requests in flight; beyond, 429 with Retry-After.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with a 429.")
    max_new_blends_per_minute: int = Field(
        60, ge=0, description="Most new client-chosen blends (t2.experts with two or more experts, not used "
        "recently) per minute, server-wide; beyond, 429. Each new blend costs a weight composition. 0 = no limit.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest a request may take (first pass + answer); beyond, it is aborted (504).")
    graceful_timeout_s: float = Field(
        60.0, ge=0, description="On SIGTERM, how long in-flight requests may finish before the exit.")
    # ---- vLLM engine (--engine vllm only; vLLM's own flag names) ----
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs (ranks) each layer is split over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages the layers are split into.")
    distributed_executor_backend: Literal["auto", "mp", "ray", "uni"] = Field(
        "auto", description="vLLM: how ranks run: mp (processes on this node), ray (a Ray cluster, across "
        "nodes), uni (in process; one rank); auto = uni for one rank, else vLLM's choice.")
    max_model_len: Optional[int] = Field(
        None, ge=16, description="vLLM: prompt + answer tokens per sequence. Default: the model's.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM: share of each GPU's memory for weights and KV cache.")
    enforce_eager: Optional[bool] = Field(
        None, description="vLLM: no CUDA graphs (eager mode). Default: eager on a CPU, graphs on a GPU.")
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM: further AsyncEngineArgs as a JSON object, e.g. "
        "'{\"max_num_batched_tokens\": 4096}'; names and types are checked against vLLM's.")

    @field_validator("vllm_engine_args", mode="before")
    @classmethod
    def _json_object(cls, v: Any) -> Any:
        if v is None:                   # the flag's default
            return {}
        if isinstance(v, str):          # from the flag or T2_VLLM_ENGINE_ARGS
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"must be a JSON object of AsyncEngineArgs ({e})") from None
            if not isinstance(v, dict):
                raise ValueError("must be a JSON object of AsyncEngineArgs, e.g. '{\"block_size\": 16}'")
        return v

    @model_validator(mode="after")
    def _vllm_only(self) -> "ServerConfig":
        if self.engine != "vllm":
            changed = sorted(n for n in VLLM_FIELDS if getattr(self, n) != type(self).model_fields[n].get_default(
                call_default_factory=True))
            if changed:
                flags = ", ".join("--" + n.replace("_", "-") for n in changed)
                raise ValueError(f"{flags}: only for --engine vllm")
        return self
    # ---- scaling out: Ray Serve replicas (server/ray_serve.py; needs the extra .[ray]) ----
    ray: bool = Field(False, description="Serve through Ray Serve: replicas behind Ray's proxy on host:port.")
    ray_address: Optional[str] = Field(
        None, description="Ray cluster to join (e.g. ray://head:10001 or auto); unset: start a local one.")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas, each with its own engine (the minimum "
                          "when max_replicas is set).")
    max_replicas: Optional[int] = Field(
        None, ge=1, description="Autoscale between replicas and this many on ongoing requests (unset: fixed).")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica.")

    def resolved_cache_dir(self) -> Path:
        from server.default_model import default_cache_dir
        return self.cache_dir or default_cache_dir()


VLLM_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "max_model_len",
               "gpu_memory_utilization", "enforce_eager", "vllm_engine_args")
