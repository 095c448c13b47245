"""Prometheus metrics of one app: the `vllm:` series dashboards expect, plus the two-pass series of ours.

Contract:
- `Metrics(engine, model_name)` owns its own `CollectorRegistry` (app-scoped: several apps in one process,
  as in the tests, never share or collide); `render()` gives the text exposition for `GET /metrics`.
- Gauges of the engine's state (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `t2_swaps_total`,
  `t2_engine_healthy`) are read from `engine.health()` (an EngineHealth: `running`, `waiting`, `swaps`, `ok`)
  at scrape time, so they can never drift from the engine.
- Serving calls `request_done(...)` once per finished request (success, abort or error) and
  `first_token(...)` once per request at its first generated token; nothing else writes the series.
- Label values are bounded: an adaptation label is `base`, a single expert's name, or `mix` (client-chosen
  blends would otherwise make the cardinality unbounded).

Series (`model_name` label on every vllm: series, as vLLM does):
  vllm:num_requests_running, vllm:num_requests_waiting                  gauges
  vllm:prompt_tokens_total, vllm:generation_tokens_total                counters
  vllm:request_success_total{finished_reason}                           counter
  vllm:time_to_first_token_seconds, vllm:e2e_request_latency_seconds,
  vllm:time_per_output_token_seconds, vllm:request_queue_time_seconds   histograms
  vllm:request_prompt_tokens, vllm:request_generation_tokens            histograms
  t2_first_pass_seconds{strategy}, t2_patch_seconds, t2_queue_wait_seconds   histograms
  t2_swaps_total                                                        counter (from the engine)
  t2_requests_total{strategy,label,adaptation}, t2_expert_requests_total{expert}   counters
  t2_request_errors_total{code}                                         counter (HTTP status of failures)
  t2_engine_healthy                                                     gauge (1 ok, 0 fault)
  t2_adaptations_per_step, t2_factored_step_share                       gauges (engines that report them)
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from experts.mix import BASE_NAME
from server.engines.base import Engine, EngineHealth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# the buckets vLLM uses for these series (seconds)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
         40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def adaptation_label(mix: dict[str, float]) -> str:
    """A bounded label for an adaptation: base, the expert's name, or mix."""
    if not mix:
        return BASE_NAME
    return next(iter(mix)) if len(mix) == 1 else "mix"


class _EngineCollector(Collector):
    """Scrape-time view of the engine's own counters (never stored twice)."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterable:
        try:
            h = self.engine.health()
        except Exception:  # noqa: BLE001 - a scrape must never fail because the engine is down
            h = EngineHealth(ok=False, engine="unknown")
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences in the batch the engine runs now.",
                                    labels=["model_name"])
        running.add_metric([self.model_name], float(h.running))
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting for a batch.",
                                    labels=["model_name"])
        waiting.add_metric([self.model_name], float(h.waiting))
        swaps = CounterMetricFamily("t2_swaps", "Weight swaps (patches) the engine made.")
        swaps.add_metric([], float(h.swaps))
        healthy = GaugeMetricFamily("t2_engine_healthy", "1 when the engine is healthy, 0 after a fault.")
        healthy.add_metric([], 1.0 if h.ok else 0.0)
        fams = [running, waiting, swaps, healthy]
        # mixed batches (issue 10): only engines that know them report these keys
        for key, name, doc in (("adaptations_per_step", "t2_adaptations_per_step",
                                "Mean distinct adaptations per engine step (the base counts as one)."),
                               ("factored_share", "t2_factored_step_share",
                                "Share of engine steps run in the factored form (per-row gains).")):
            if h.details.get(key) is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(h.details[key]))
                fams.append(g)
        return fams


class Metrics:
    def __init__(self, engine: Engine, model_name: str | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self._model = model_name or engine.model_name
        r, m = self.registry, ["model_name"]
        self.registry.register(_EngineCollector(engine, self._model))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed (answer pass).", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               m + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first generated token.", m,
                              buckets=_TTFT, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", m, buckets=_E2E,
                             registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token after the first.",
                              m, buckets=_TPOT, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time the answer pass waited for its batch.",
                               m, buckets=_E2E, registry=r)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", m,
                                    buckets=_TOKENS, registry=r)
        self.req_gen = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", m,
                                 buckets=_TOKENS, registry=r)
        self.first_pass = Histogram("t2_first_pass_seconds", "Wall time of the dispatch (first) pass.",
                                    ["strategy"], buckets=_FAST, registry=r)
        self.patch = Histogram("t2_patch_seconds", "Weight swaps a request's batch needed (0 s: none).",
                               buckets=_FAST, registry=r)
        self.queue_wait = Histogram("t2_queue_wait_seconds", "Time the answer pass waited for batch and weights.",
                                    buckets=_FAST, registry=r)
        self.requests = Counter("t2_requests", "Requests by dispatch strategy, first-pass label and adaptation.",
                                ["strategy", "label", "adaptation"], registry=r)
        self.expert_requests = Counter("t2_expert_requests", "Requests whose answer used this expert.",
                                       ["expert"], registry=r)
        self.errors = Counter("t2_request_errors", "Failed /v1 requests by HTTP status.", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- writers (serving) ------------------------------------------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self._model).observe(seconds)

    def request_done(self, *, strategy: str, label: str | None, mix: dict[str, float], finish: list[str | None],
                     prompt_tokens: int, completion_tokens: int, e2e_s: float, ttft_s: float | None,
                     first_pass_ms: float, patch_ms: float, queue_ms: float) -> None:
        """One finished request (all its n choices)."""
        m = self._model
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        for reason in finish:
            self.success.labels(m, reason or "abort").inc()
        self.e2e.labels(m).observe(e2e_s)
        if ttft_s is not None and completion_tokens > len(finish):
            self.tpot.labels(m).observe(max(0.0, e2e_s - ttft_s) / (completion_tokens / len(finish) - 1))
        self.queue.labels(m).observe(queue_ms / 1e3)
        self.req_prompt.labels(m).observe(prompt_tokens)
        self.req_gen.labels(m).observe(completion_tokens)
        if strategy in ("prompt", "classifier"):
            self.first_pass.labels(strategy).observe(first_pass_ms / 1e3)
        self.patch.observe(patch_ms / 1e3)
        self.queue_wait.observe(queue_ms / 1e3)
        self.requests.labels(strategy, label or "", adaptation_label(mix)).inc()
        for expert in mix:
            self.expert_requests.labels(expert).inc()

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()
