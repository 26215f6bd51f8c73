"""Ray Serve scale-out (server/cluster): a local Ray instance, 2 engine replicas of a tiny
random Llama, the OpenAI client against the ingress.

- every adapter kind, completions / chat / streaming: greedy outputs equal one process's;
- the cluster's views: /v1/adapters with each replica's tier, /metrics with a replica label;
- affinity: 8 adapters over 2 replicas of 4 slots, a trace of 200 requests, few adapter loads;
- upload, replace and delete through the cluster, seen by both replicas;
- a replica killed mid-trace: only its running requests fail, each with a clean 503; the
  cluster serves again in bounded time;
- affinity off (Ray's plain load balancing): the same trace loads adapters many more times,
  and requests to one uploaded adapter land on both replicas, with the right outputs.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray", reason="the cluster needs the ray extra (adapterserve[ray])")
peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402

from adapterserve.adapters.spec import BaseFingerprint  # noqa: E402
from adapterserve.server.cluster import launch  # noqa: E402
from adapterserve.server.cluster.proxy import REPORTS_CACHE_S  # noqa: E402
from adapterserve.server.cluster.reports import read_reports  # noqa: E402
from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.main import create_app  # noqa: E402
from tests.adapters.conftest import bottleneck_config  # noqa: E402
from tests.adapters.makers import bottleneck_dir, save_peft  # noqa: E402
from tests.evaluation.conftest import TERMINAL, make_data_dir, results, wait_for  # noqa: E402
from tests.helpers import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

BASE = "tiny"
SLOTS = 4
NEW_TOKENS = 6
PROMPT = "Once upon a time"
TRACE_LEN = 200
TRACE_CONCURRENCY = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kind_configs() -> dict:
    return {
        "lora": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
        "dora": peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]
        ),
        "ia3": peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }


BOTTLENECKS = {
    "series": bottleneck_config(bottleneck_size=6, non_linearity="tanh", scaling=0.5),
    "parallel": bottleneck_config(
        bottleneck_size=8,
        non_linearity="relu",
        scaling=2.0,
        use_parallel_adapter=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
}


EXTRA_REQUESTS = {  # beam search and a structured output, on the base model
    "beam": {
        "model": BASE,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "use_beam_search": True,
        "best_of": 3,
        "n": 1,
        "ignore_eos": True,
    },
    "choice": {
        "model": BASE,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "guided_choice": ["yes", "no", "maybe"],
    },
}


@dataclass
class Cluster:
    root: Path
    settings: Settings
    kinds: dict[str, Path]  # one adapter of each kind, served from the start
    trace_adapters: list[str]  # 8 LoRAs for the affinity traces
    uploads: dict[str, Path]  # adapters the tests upload (not served at start)
    expected: dict[tuple[str, str], str]  # (model, "completion" | "chat") -> one process's text
    http: httpx.Client
    client: openai.OpenAI
    loads: dict[str, float] = field(default_factory=dict)  # adapter loads of a trace, by mode


def lora(path: Path, base: Path, seed: int, r: int = 4) -> Path:
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
    return save_peft(path, base, config, seed, scale=0.3)


def one_process_outputs(settings: Settings, models: list[str]) -> dict[tuple[str, str], str]:
    """Greedy outputs of every model from a single-process server (the reference)."""
    torch.set_num_threads(1)
    out = {}
    with TestClient(create_app(settings)) as client:
        for kind, body in EXTRA_REQUESTS.items():
            out[BASE, kind] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        for model in models:
            out[model, "completion"] = client.post(
                "/v1/completions", json=completion(model)
            ).json()["choices"][0]["text"]
            out[model, "chat"] = client.post("/v1/chat/completions", json=chat(model)).json()[
                "choices"
            ][0]["message"]["content"]
    return out


def completion(model: str, max_tokens: int = NEW_TOKENS) -> dict:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def chat(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    base = make_tiny_llama(root / "base", seed=5)
    fingerprint = BaseFingerprint.from_hf_config(json.loads((base / "config.json").read_text()))
    kinds = {
        name: save_peft(root / name, base, cfg, seed, scale=0.3)
        for seed, (name, cfg) in enumerate(kind_configs().items())
    }
    kinds |= {
        name: bottleneck_dir(root / name, fingerprint, cfg, seed)
        for seed, (name, cfg) in enumerate(BOTTLENECKS.items())
    }
    trace = {f"t{i}": lora(root / f"t{i}", base, 100 + i) for i in range(8)}
    uploads = {
        "up-v1": lora(root / "up-v1", base, 200),
        "up-v2": lora(root / "up-v2", base, 201, r=8),
    }
    served = {**kinds, **trace}
    common = dict(
        model=str(base),
        served_model_name=BASE,
        device="cpu",
        num_kv_blocks=256,
        max_adapter_rank=16,
        adapter_slots=SLOTS,
        host_adapter_cache=16,
    )
    single = Settings(
        cache_dir=root / "single",
        **common,
        adapters=[f"{n}={p}" for n, p in {**served, **uploads}.items()],
    )
    expected = one_process_outputs(single, [BASE, *kinds, "up-v1", "up-v2", "t0"])
    port = _free_port()
    settings = Settings(
        cache_dir=root / "cache",
        port=port,
        replicas=2,
        replica_num_cpus=1,
        data_dir=make_data_dir(root / "data"),
        adapters=[f"{n}={p}" for n, p in served.items()],
        **common,
    )
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False
    )
    try:
        launch.start(settings)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            _wait_for_replicas(settings, 2)
            yield Cluster(root, settings, kinds, list(trace), uploads, expected, http, client)
    finally:
        launch.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_replicas(
    settings: Settings, count: int, timeout_s: float = 120.0, exclude: frozenset[str] = frozenset()
) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = [r for r in read_reports(settings.cluster_state_dir) if r.replica not in exclude]
        if len(reports) >= count:
            return reports
        time.sleep(0.5)
    raise AssertionError(f"{count} replica reports did not appear in {timeout_s} s")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_fresh_reports(settings: Settings, count: int = 2, timeout_s: float = 30.0) -> None:
    """Until `count` replicas have written a report after now (their counters as of now), and
    the ingress's report cache (REPORTS_CACHE_S) has had time to expire."""
    since = time.time()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(r.time > since for r in read_reports(settings.cluster_state_dir)) >= count:
            time.sleep(REPORTS_CACHE_S)
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} replicas did not report within {timeout_s} s")


def fresh_metrics(cluster: Cluster) -> str:
    wait_for_fresh_reports(cluster.settings)
    return cluster.http.get("/metrics").text


def run_trace(cluster: Cluster, seed: int, length: int = TRACE_LEN) -> list[httpx.Response]:
    """`length` completions over the 8 trace adapters, skewed, TRACE_CONCURRENCY at a time."""
    rng = random.Random(seed)
    models = [rng.choice(cluster.trace_adapters) for _ in range(length)]

    def send(model: str) -> httpx.Response:
        return cluster.http.post("/v1/completions", json=completion(model, max_tokens=2))

    with ThreadPoolExecutor(TRACE_CONCURRENCY) as pool:
        return list(pool.map(send, models))


# ---------------------------------------------------------------- affinity


def warm_up(cluster: Cluster) -> None:
    """One request per trace adapter, one at a time: Ray Serve places each adapter that no
    replica claims yet on a replica that claims the fewest, once the previous claim reached
    the ingress's router (a burst of new adapters would be placed at random, some on both)."""
    for model in cluster.trace_adapters:
        assert cluster.http.post("/v1/completions", json=completion(model, 1)).status_code == 200
        time.sleep(0.5)


def test_affinity_keeps_adapter_loads_low(cluster: Cluster):
    """First in the module: the replicas claim no adapter yet."""
    before = metric(fresh_metrics(cluster), "adapterserve_adapter_loads_total")
    warm_up(cluster)
    responses = run_trace(cluster, seed=1)
    assert [r.status_code for r in responses] == [200] * TRACE_LEN
    text = fresh_metrics(cluster)
    loads = metric(text, "adapterserve_adapter_loads_total") - before
    hits = metric(text, "adapterserve_cluster_routing_total", result="hit")
    misses = metric(text, "adapterserve_cluster_routing_total", result="miss")
    print(
        f"affinity on: {loads:.0f} adapter loads for {TRACE_LEN} + 8 requests; routing hits "
        f"{hits:.0f}, misses {misses:.0f}"
    )
    cluster.loads["affinity"] = loads
    assert loads <= 2 * len(cluster.trace_adapters), loads


# ---------------------------------------------------------------- the OpenAI API


def test_every_kind_equals_one_process(cluster: Cluster):
    for model in [BASE, *cluster.kinds]:
        done = cluster.client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert done.choices[0].text == cluster.expected[model, "completion"], model
        reply = cluster.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].message.content == cluster.expected[model, "chat"], model
        stream = cluster.client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert (
            "".join(c.choices[0].text for c in stream if c.choices)
            == cluster.expected[model, "completion"]
        )
        stream = cluster.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == cluster.expected[model, "chat"], model


def test_beam_search_and_structured_outputs_equal_one_process(cluster: Cluster):
    for kind, body in EXTRA_REQUESTS.items():
        got = cluster.http.post("/v1/completions", json=body)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == cluster.expected[BASE, kind], kind
    assert cluster.expected[BASE, "choice"] in ("yes", "no", "maybe")


def test_errors_are_the_servers(cluster: Cluster):
    unknown = cluster.http.post("/v1/completions", json=completion("nope"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    bad = cluster.http.post("/v1/completions", json={**completion(BASE), "temperature": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    by_path = cluster.http.post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(cluster.root)}
    )
    assert by_path.status_code == 403 and "cluster" in by_path.json()["error"]["message"]


def test_views_and_metrics_cover_every_replica(cluster: Cluster):
    for model in cluster.kinds:
        assert cluster.http.post("/v1/completions", json=completion(model, 1)).status_code == 200
    assert cluster.http.post("/v1/completions", json=completion("lora", 1)).status_code == 200
    reports = _wait_for_replicas(cluster.settings, 2)
    replicas = {r.replica for r in reports}
    wait_for_fresh_reports(cluster.settings)
    cards = {c["id"]: c for c in cluster.http.get("/v1/adapters").json()["data"]}
    assert set(cluster.kinds) <= set(cards)
    assert set(cards["lora"]["replicas"]) == replicas  # every replica reports every adapter
    assert "device" in cards["lora"]["replicas"].values()  # where it was just served
    models = {m["id"]: m for m in cluster.http.get("/v1/models").json()["data"]}
    assert models["lora"]["replicas"] == cards["lora"]["replicas"] or models["lora"]["replicas"]
    text = fresh_metrics(cluster)
    for replica in replicas:
        assert f'adapterserve_kv_blocks_total{{replica="{replica}"}}' in text
    assert metric(text, "adapterserve_cluster_routing_total") >= len(cluster.kinds)
    assert text.count("# TYPE adapterserve_requests_total ") == 1


# ---------------------------------------------------------------- one adapter state


def upload(cluster: Cluster, name: str, folder: Path, replace: bool = False) -> httpx.Response:
    files = [
        ("files", (p.name, io.BytesIO(p.read_bytes())))
        for p in sorted(folder.iterdir())
        if p.name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return cluster.http.post(
        "/v1/adapters", params={"replace": str(replace).lower()}, data={"name": name}, files=files
    )


def wait_for_rank(cluster: Cluster, name: str, rank: int | None, timeout_s: float = 20) -> None:
    """Every replica's report shows `name` at `rank` (None: without `name`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = read_reports(cluster.settings.cluster_state_dir)
        ranks = [{a.name: a.rank for a in r.adapters}.get(name) for r in reports]
        if len(reports) >= 2 and all(r == rank for r in ranks):
            return
        time.sleep(0.3)
    raise AssertionError(f"the replicas did not all show {name} at rank {rank}: {ranks}")


def test_upload_replace_delete_seen_by_every_replica(cluster: Cluster):
    created = upload(cluster, "up", cluster.uploads["up-v1"])
    assert created.status_code == 201, created.text
    for _ in range(4):
        got = cluster.http.post("/v1/completions", json=completion("up")).json()
        assert got["choices"][0]["text"] == cluster.expected["up-v1", "completion"]
    wait_for_rank(cluster, "up", 4)
    assert upload(cluster, "up", cluster.uploads["up-v2"]).status_code == 409
    replaced = upload(cluster, "up", cluster.uploads["up-v2"], replace=True)
    assert replaced.status_code == 201 and replaced.json()["rank"] == 8
    for _ in range(4):
        got = cluster.http.post("/v1/completions", json=completion("up")).json()
        assert got["choices"][0]["text"] == cluster.expected["up-v2", "completion"]
    wait_for_rank(cluster, "up", 8)
    assert cluster.http.delete("/v1/adapters/up").status_code == 200
    assert cluster.http.post("/v1/completions", json=completion("up")).status_code == 404
    assert "up" not in {c["id"] for c in cluster.http.get("/v1/adapters").json()["data"]}
    wait_for_rank(cluster, "up", None)
    assert cluster.http.delete("/v1/adapters/up").status_code == 404


# ---------------------------------------------------------------- faults


def test_a_killed_replica_costs_only_its_running_requests(cluster: Cluster):
    """Half the requests stream: a stream cut by the kill ends with an error event and [DONE]."""
    reports = _wait_for_replicas(cluster.settings, 2)
    victim = reports[0]
    plain: list[httpx.Response] = []
    streamed: list[list[str]] = []

    def send(i: int) -> None:
        body = completion(cluster.trace_adapters[i % len(cluster.trace_adapters)], max_tokens=24)
        if i % 2:
            plain.append(cluster.http.post("/v1/completions", json=body))
            return
        with cluster.http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200 or r.status_code == 503, r.status_code
            streamed.append(
                [line for line in r.iter_lines() if line] if r.status_code == 200 else ["503"]
            )

    with ThreadPoolExecutor(TRACE_CONCURRENCY) as pool:
        futures = [pool.submit(send, i) for i in range(48)]
        time.sleep(1.5)
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        for future in futures:
            future.result(timeout=120)  # never a hang
    failed = [r for r in plain if r.status_code != 200]
    for response in failed:
        assert response.status_code == 503, response.text
        assert response.headers.get("retry-after")
        assert response.json()["error"]["code"] == "replica_unavailable"
    cut = [
        events for events in streamed if any('"error"' in e for e in events) or events == ["503"]
    ]
    for events in cut:
        if events != ["503"]:
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "replica_unavailable" and events[-1] == "data: [DONE]"
    for events in streamed:
        assert events[-1] in ("data: [DONE]", "503")
    print(
        f"killed replica {victim.replica}: {len(failed)} of {len(plain)} plain and {len(cut)} "
        f"of {len(streamed)} streamed requests failed"
    )
    assert len(failed) + len(cut) <= TRACE_CONCURRENCY  # only what was running on it
    for model in [BASE, "t0"]:  # served at once by the surviving replica
        got = cluster.http.post("/v1/completions", json=completion(model))
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == cluster.expected[model, "completion"]
    _wait_for_replicas(cluster.settings, 2, timeout_s=90, exclude=frozenset({victim.replica}))
    print(f"2 replicas again {time.monotonic() - started:.1f} s after the kill")


def test_an_evaluation_job_runs_through_the_cluster_and_outlives_a_replica(cluster: Cluster):
    body = {
        "models": ["base", "t0", "t1"],
        "datasets": ["gsm8k", "boolq"],
        "limit": 4,
        "max_tokens": 12,
    }
    job = cluster.http.post("/v1/evaluations", json=body)
    assert job.status_code == 202, job.text
    victim = _wait_for_replicas(cluster.settings, 2)[1]
    mid = wait_for(
        cluster.http,
        job.json()["id"],
        timeout_s=120,
        done=lambda j: j["progress"]["done"] >= 1 or j["status"] in TERMINAL,
    )
    assert mid["status"] == "running", mid  # killed mid-job: its first answers are in
    os.kill(victim.pid, signal.SIGKILL)
    job = wait_for(cluster.http, job.json()["id"], timeout_s=240)
    assert job["status"] == "succeeded", job
    assert len(results(cluster.http, job["id"])) == 3 * 2 * 4
    text = fresh_metrics(cluster)
    assert metric(text, "adapterserve_requests_total", model="t0") > 0  # on the replicas
    _wait_for_replicas(cluster.settings, 2, timeout_s=90, exclude=frozenset({victim.replica}))


# ---------------------------------------------------------------- affinity off


def test_affinity_off_loads_more_and_uploads_serve_on_both(cluster: Cluster):
    settings = cluster.settings.model_copy(update={"cluster_affinity": False})
    old = {r.replica for r in read_reports(settings.cluster_state_dir)}
    launch.deploy(settings)  # the same app name: Ray Serve replaces both deployments
    _wait_for_replicas(settings, 2, exclude=frozenset(old))
    before = metric(fresh_metrics(cluster), "adapterserve_adapter_loads_total")
    warm_up(cluster)
    responses = run_trace(cluster, seed=1)
    assert [r.status_code for r in responses] == [200] * TRACE_LEN
    loads = metric(fresh_metrics(cluster), "adapterserve_adapter_loads_total") - before
    print(f"affinity off: {loads:.0f} adapter loads for {TRACE_LEN} + 8 requests")
    with_affinity = cluster.loads.get("affinity")
    if with_affinity is not None:
        assert loads > 2 * with_affinity, (loads, with_affinity)
    assert upload(cluster, "both", cluster.uploads["up-v1"]).status_code == 201
    with ThreadPoolExecutor(TRACE_CONCURRENCY) as pool:  # concurrent: Ray spreads them
        answers = list(
            pool.map(
                lambda _: cluster.http.post("/v1/completions", json=completion("both")).json(),
                range(24),
            )
        )
    assert {a["choices"][0]["text"] for a in answers} == {cluster.expected["up-v1", "completion"]}
    text = fresh_metrics(cluster)
    served = [
        metric(text, "adapterserve_requests_total", model="both", replica=r.replica)
        for r in read_reports(settings.cluster_state_dir)
    ]
    assert sum(served) == 24 and all(n > 0 for n in served), served
