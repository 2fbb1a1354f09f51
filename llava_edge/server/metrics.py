"""Prometheus metrics of one server: requests, tokens, latencies, and the engine's slots, queue and image cache."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/api/chat", "/api/generate", "/api/tags", "/api/version",
             "/api/show", "/api/ps", "/health", "/metrics")


class EngineCollector:
    """Read engine.stats() at scrape time, so the gauges are never stale."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("llava_edge_busy_slots", "sequences generating or prefilling", stats.get("busy", 0))
        yield GaugeMetricFamily("llava_edge_slots", "sequences in the llama.cpp context", stats.get("slots", 0))
        yield GaugeMetricFamily("llava_edge_queue_depth", "requests waiting for a slot", stats.get("queued", 0))
        yield CounterMetricFamily("llava_edge_image_cache_hits", "image embeddings taken from the cache",
                                  stats.get("image_cache_hits", 0))
        yield CounterMetricFamily("llava_edge_answer_tokens", "answer tokens the engine made, a cancelled answer's "
                                  "included", stats.get("answer_tokens", 0))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("llava_edge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llava_edge_prompt_tokens", "prompt positions (image included)",
                                     registry=self.registry)
        self.cached_tokens = Counter("llava_edge_cached_tokens", "prompt positions taken from the KV cache",
                                     registry=self.registry)
        self.generated_tokens = Counter("llava_edge_generated_tokens", "answer tokens", registry=self.registry)
        self.ttft = Histogram("llava_edge_ttft_seconds", "time to first token (image encode included)",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=self.registry)
        self.decode = Histogram("llava_edge_decode_tokens_per_second", "decode rate of one answer",
                                buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640), registry=self.registry)
        self.attached_files_dropped = Counter(
            "llava_edge_attached_files_dropped", "entries of Open WebUI's <attached_files> listing taken out of "
            "the prompt (the message's own images)", registry=self.registry)
        self.tools_ignored = Counter("llava_edge_tools_ignored", "tools sent with requests and ignored (the model "
                                     "cannot call tools)", registry=self.registry)
        self.truncated_messages = Counter("llava_edge_truncated_messages", "oldest messages dropped so that an "
                                          "Ollama /api/chat conversation fits the context", registry=self.registry)
        self.prompts_cut = Counter("llava_edge_prompts_cut", "Ollama /api/chat prompts whose last message was cut at "
                                   "its start to fit the context", registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def count_answer(self, timings) -> None:
        self.prompt_tokens.inc(timings.n_prompt_tokens)
        self.cached_tokens.inc(getattr(timings, "n_cached", 0))
        self.generated_tokens.inc(timings.n_generated)
        if timings.ttft_ms > 0:
            self.ttft.observe(timings.ttft_ms / 1000)
        if timings.decode_tokens_per_s > 0:
            self.decode.observe(timings.decode_tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
