"""The Grafana dashboard (docker/grafana/t2-dashboard.json) queries only series the server exports.

A real server (the tiny model on loopback) answers requests of every kind that writes a labelled series
(dispatch by prompt and classifier, an explicit expert, a blend, a stream, an error); then its /metrics is
scraped and parsed. Every `vllm:` / `t2_` name in every panel's PromQL must be an exported sample name
(histograms as _bucket/_sum/_count), every label a panel groups by must be on that series, and every
exported family must be plotted somewhere (a new series without a panel fails here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

DASH = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "t2-dashboard.json"
NAME = re.compile(r"\b(vllm:[a-z0-9_:]+|t2_[a-z0-9_]+)")
# a selector or a function argument: `sum by(a, b) (rate(name_bucket{...}[...]))`
BY = re.compile(r"by\s*\(([^)]*)\)\s*\((.*)")


def panels() -> list[dict]:
    return json.loads(DASH.read_text())["panels"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


@pytest.fixture(scope="module")
def scraped(client, live):
    http = httpx.Client(base_url=live.url, timeout=120)
    # 1. traffic that writes every labelled series
    for extra in ({"t2": {"dispatch": "prompt"}}, {"t2": {"dispatch": "classifier"}}, {}):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "2+2?"}],
                                       max_tokens=3, extra_body=extra)
    client.chat.completions.create(model=f"{live.engine.model_name}:math",
                                   messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                   response_format={"type": "json_object"})        # a constrained request
    for _ in client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True):
        pass
    assert http.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code >= 400
    # 2. what /metrics exports: sample name -> label names seen
    r = http.get("/metrics")
    assert r.status_code == 200
    samples: dict[str, set[str]] = {}
    families: dict[str, str] = {}
    for fam in text_string_to_metric_families(r.text):
        families[fam.name] = fam.type
        for s in fam.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    return samples, families


def test_dashboard_is_well_formed():
    d = json.loads(DASH.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"] and d["title"]
    for p in d["panels"]:
        assert p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:          # balanced brackets: a typo here is a panel Grafana cannot draw
            e = t["expr"]
            assert e.count("(") == e.count(")") and e.count("{") == e.count("}") and e.count("[") == e.count("]"), e


def test_every_queried_series_and_label_is_exported(scraped):
    samples, _ = scraped
    for e in exprs():
        names = NAME.findall(e)
        assert names, f"no vllm:/t2_ series in {e!r}"
        for n in names:
            assert n in samples, f"{n} (in {e!r}) is not exported; exported: {sorted(samples)}"
        m = BY.search(e)
        if m:
            grouped = {x.strip() for x in m.group(1).split(",")} - {"le"}
            for n in NAME.findall(m.group(2)):
                assert grouped <= samples[n], f"{n} has no label {grouped - samples[n]} (in {e!r})"
        if "$model_name" in e:
            for n in NAME.findall(e):
                if n.startswith("vllm:"):
                    assert "model_name" in samples[n], e


def test_every_exported_series_has_a_panel(scraped):
    _, families = scraped
    plotted = " ".join(exprs())
    ours = [f for f in families if f.startswith(("vllm:", "t2_")) and not f.endswith("_created")]
    assert ours
    missing = [f for f in ours if not re.search(re.escape(f) + r"(_total|_bucket|_sum|_count)?\b", plotted)]
    assert not missing, f"exported but on no panel: {missing}"
