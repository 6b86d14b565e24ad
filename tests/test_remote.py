"""The remote teacher against loopback services, one per protocol: stores equal to a local
extraction, faults that change nothing, a ledger that never pays twice, budgets, dry runs, kill -9.

Every service here is on 127.0.0.1 (an ephemeral port), in this process, answering from the tiny
local teacher: ``embedcache serve`` itself, and fakes of infinity's OpenAI shape and Cohere's v2."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("fastapi", reason="embedcache serve needs the serve extra: pip install '.[serve]'")

import embedcache
from embedcache.config import ExtractConfig, TeacherConfig, apply_overrides, build_config, replace, to_dict
from embedcache.errors import BudgetError, ConfigError, TeacherLoadError
from embedcache.extract import extract
from embedcache.extract.verify import verify_store
from embedcache.serve import ServeConfig, build_app
from embedcache.serve.keys import KeyInfo, KeyRing, key_digest
from embedcache.store import Store
from embedcache.teachers import build_teacher
from embedcache.teachers.remote import RemoteError, RemoteUnavailableError
from embedcache.teachers.remote.errors import BadAnswer

from conftest import alter_emb, quiet, teacher_reads
from remote_fakes import Faults, LiveServer, ModelSwap, Tamper, cohere_app, files_containing, openai_app

KEY = "sk-ec-test-9f8e7d6c5b4a-SECRET"
KEY_ENV = "EMBEDCACHE_TEST_KEY"
PROTOCOLS = ["embedcache", "openai", "cohere-v2"]
ARRAYS = ["image/emb", "image/view_params", "image/pixels", "image/status"]
MODELS = {"embedcache": "", "openai": "fake-clip", "cohere-v2": "embed-v4.0"}


def make(folder: Path, out: str, teacher_cfg: TeacherConfig, *overrides: str) -> ExtractConfig:
    """conftest's make_cfg, for any folder: 30 synthetic images x 3 views, blocks of 8, batches of 4."""
    base = to_dict(ExtractConfig())
    base["teacher"] = to_dict(teacher_cfg)
    base.update({"out": str(folder / out), "progress": False, "num_workers": 0, "batch_size": 4, "block_rows": 8})
    base["dataset"].update({"name": "synthetic", "num_classes": 3, "num_domains": 2, "per_class": 5, "image_size": 40})
    base["views"]["count"] = 3
    base["canvas"]["size"] = 48
    return build_config(ExtractConfig, teacher_reads(apply_overrides(base, overrides), overrides))


def arrays(path) -> dict:
    with Store(str(path)) as st:
        out = {a: st.b.read(a) for a in ARRAYS}
        for src in st.manifest["text"]["sources"]:
            out[f"text/{src}/class_emb"] = st.b.read(f"text/{src}/class_emb")
    return out


def assert_same(a: dict, b: dict) -> None:
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def assert_same_up_to_batching(a: dict, b: dict) -> None:
    """A teacher run on other batch sizes may round differently (CPU kernels are picked per shape:
    on an AVX-512 machine batches of 6 and 12 differ in the last bit): embeddings within two steps
    of their stored dtype, everything else bit for bit."""
    for k in a:
        if k.endswith("emb"):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            step = np.spacing(np.abs(a[k])).astype(np.float64)  # one step of the stored dtype at each value
            assert (np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)) <= 2 * step).all(), k
        else:
            assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_teacher_cfg, tiny_teacher):
    """The same extraction with the tiny teacher locally: the arrays every remote store must equal."""
    folder = tmp_path_factory.mktemp("local")
    cfg = make(folder, "local.zarr", tiny_teacher_cfg)
    extract(cfg, teacher=tiny_teacher, log=quiet)
    return arrays(cfg.out)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("EMBEDCACHE_API_KEY", raising=False)


def serve_app(tiny_teacher_cfg, tiny_teacher, ledger: Path, **settings):
    cfg = ServeConfig(teacher=tiny_teacher_cfg, ledger=str(ledger), **settings)
    return build_app(cfg, teacher=tiny_teacher, keys=KeyRing({key_digest(KEY): KeyInfo("alice")}))


def service_app(protocol, tiny_teacher_cfg, tiny_teacher, folder: Path, **kw):
    if protocol == "embedcache":
        return serve_app(tiny_teacher_cfg, tiny_teacher, folder / "server.sqlite", **kw)
    if protocol == "openai":
        return openai_app(tiny_teacher, KEY, **kw)
    return cohere_app(tiny_teacher, KEY, **kw)


def remote(folder: Path, out: str, teacher_cfg, protocol: str, url: str, *overrides: str) -> ExtractConfig:
    # embedcache serve says its input size; for the others the user gives the model's (here the tiny teacher's)
    size = [] if protocol == "embedcache" else ["teacher.input_size=32"]
    return make(folder, out, teacher_cfg, "teacher.name=remote", f"teacher.protocol={protocol}", *size,
                f"teacher.model={MODELS[protocol]}", f"teacher.url={url}", f"teacher.api_key_env={KEY_ENV}",
                f"teacher.ledger={folder / 'client.sqlite'}", "teacher.timeout=1.0", "teacher.retry_backoff=0.02",
                *overrides)


def charged(app) -> tuple:
    """(inputs charged in all, inputs charged twice) by a loopback service."""
    if hasattr(app.state, "books"):
        return len(app.state.books.items), app.state.books.doubles()
    led = app.state.service.ledger
    return sum(r["queries"] for r in led.summary()), led.double_charges()


def config_file(folder: Path, cfg: ExtractConfig) -> Path:
    """``cfg`` written as the YAML an `extract --config` reads."""
    conf = folder / "remote.yaml"
    conf.write_text(yaml.safe_dump(to_dict(cfg)))
    return conf


def extract_cli(conf: Path, *args: str):
    """`embedcache extract --config conf ARGS` in this process (its result: exit code and output)."""
    from click.testing import CliRunner

    from embedcache.cli import main

    return CliRunner().invoke(main, ["extract", "--config", str(conf), *args])


def resent_after_answer(ledger_path: Path) -> int:
    """Inputs the client sent again after their answer had arrived (the ledger's audit)."""
    with sqlite3.connect(str(ledger_path)) as db:
        (n,) = db.execute("SELECT COUNT(*) FROM sends s JOIN request_items i ON i.request = s.request "
                          "JOIN entries e ON e.key = i.key WHERE e.answered IS NOT NULL AND s.sent > e.answered").fetchone()
    return int(n)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_store_equals_local_and_dry_run_counts_the_cost(protocol, tmp_path, local, tiny_teacher_cfg, tiny_teacher,
                                                        key_env):
    app = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url)
        teacher = build_teacher(cfg.teacher)
        dry = extract(cfg, teacher=teacher, log=quiet, dry_run=True)
        limit = {"embedcache": 256, "openai": 32, "cohere-v2": 96}[protocol]
        assert dry.views == 90 and dry.cost["images"] == 90 and dry.cost["ledger_hits"] == 0
        assert dry.cost["requests"] == 8 and dry.cost["batch_limit"] == limit  # one request per call of 12 views
        assert dry.cost["requests_at_batch_limit"] == -(-90 // limit) and dry.cost["bytes"] > 0
        assert dry.cost["text_texts"] == 24 and not Path(cfg.out).exists()  # a dry run writes and pays nothing
        assert extract(cfg, teacher=teacher, log=quiet, dry_run=True).cost == dry.cost  # a second one counts afresh
        paid_before = charged(app)[0]
        res = extract(cfg, teacher=teacher, log=quiet)
        assert res.complete
        assert_same(local, arrays(cfg.out))
        with embedcache.open_store(cfg.out) as s:  # the teacher that made it is its own (online targets, queries)
            assert s.require_teacher(teacher) is teacher
        assert charged(app)[0] - paid_before == 90 + 24  # every view and prompt once
        sent = embedcache.open_store(cfg.out).manifest["teacher_usage"]["requests"]
        assert dry.cost["requests"] + dry.cost["text_requests"] == sent  # prompts: one call per text source
        # another store of the same views would cost nothing: the ledger holds every answer
        again = extract(replace(cfg, out=str(tmp_path / "other.zarr")), teacher=build_teacher(cfg.teacher), log=quiet,
                        dry_run=True)
        assert again.cost["images"] == again.cost["requests"] == again.cost["text_texts"] == 0
        assert again.cost["ledger_hits"] == 90 and again.cost["text_ledger_hits"] == 24
    with embedcache.open_store(cfg.out) as s:
        m = s.manifest
    usage = m["teacher_usage"]
    # what this call paid: without teacher.dimensions one text learnt the dimension when the test built
    # the teacher, before the call (a teacher the call builds itself counts its probe)
    assert usage["images"] == 90 and usage["texts"] == 24 and usage["retries"] == 0 and usage["bytes"] > 0
    assert usage["protocol"] == protocol and usage["server_reported"]  # the service's own count beside ours
    assert m["teacher"]["name"] == "remote" and m["teacher"]["url"] == url and KEY not in str(m)
    assert not files_containing([tmp_path], KEY.encode())
    with embedcache.open_store(cfg.out) as s:  # `inspect` says what was paid (the manifest alone did)
        said, facts = s.summary()["teacher_usage"], s.facts()
    assert said.startswith(f"{usage['queries']:,} queries paid (90 images, 24 texts, {usage['bytes']:,} bytes) in "
                           f"{usage['requests']:,} requests by 1 extract call that spent"), said
    # as data, the books as the manifest keeps them; the calls that spent apart from every call listed
    assert facts["teacher_usage"] == usage and usage["calls"] == 1 and len(facts["calls"]) == 1


def test_token_counts_are_the_servers_in_requests_it_takes(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env,
                                                           monkeypatch):
    """The client asked embedcache serve to count every prompt of a source in one request: above its
    max_batch the service refused it (413), and the counts quietly became the client's estimate, so one
    store held two counts of the same prompt (a trial). Counted in requests of the service's batch; a
    count that still fails is said, not silent."""
    import httpx

    texts = [f"a photo of a {w} dog." for w in ("big", "small", "brown", "white", "fast", "old", "young", "wet", "odd")]
    want = tiny_teacher.count_tokens(texts)
    assert want != [_estimate(t) for t in texts]  # the estimate tells them apart
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite", max_batch=4)
    with LiveServer(app) as url:
        teacher = build_teacher(remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url).teacher)
        assert teacher.count_tokens(texts) == want
        monkeypatch.setattr(teacher.transport.http, "post", lambda *a, **k: (_ for _ in ()).throw(httpx.ConnectError("x")))
        with pytest.warns(UserWarning, match="n_tokens of these 9 prompts are this client's estimate"):
            assert teacher.count_tokens(texts) == [_estimate(t) for t in texts]


def _estimate(text: str) -> int:
    from embedcache.teachers.remote.protocols import Protocol

    return Protocol.text_tokens(text)


def test_a_dry_run_weighs_the_cost_against_the_services_quota(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """embedcache serve says a key's quota (GET /v1/usage, free): the dry run priced 114 queries without a
    word of a quota of 100, and the extraction then stopped at it (a trial)."""
    from embedcache.cli.data import _quota_lines

    for quota, fits in ((100, False), (500, True)):
        app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / f"server{quota}.sqlite", quota=quota)
        with LiveServer(app) as url:
            cfg = remote(tmp_path, f"q{quota}.zarr", tiny_teacher_cfg, "embedcache", url,
                         "teacher.dimensions=32", f"teacher.ledger={tmp_path / f'client{quota}.sqlite'}")
            dry = extract(cfg, log=quiet, dry_run=True)
        assert dry.quota == (0, quota) and dry.cost["images"] + dry.cost["text_texts"] == 114
        line = _quota_lines(dry)[0]
        assert line.startswith(f"the service's quota for this key: 0 of {quota} queries used; this extraction needs 114")
        assert ("within it" in line) == fits and ("it would stop when the quota is spent, at most 100 queries in" in line) != fits, line
    assert _quota_lines(SimpleNamespace(quota=None, cost={})) == []  # a service that says none


def test_requests_fit_a_body_limit_and_the_dry_run_counts_them(tmp_path, local, tiny_teacher_cfg, tiny_teacher, key_env):
    """embedcache serve's max_request_bytes limits the request body, where images travel in base64 (a
    third more than their bytes): requests were split by the images' own bytes, so the service refused
    them (413) and extraction halved its batches, while the dry run said fewer requests than were sent,
    and 1 "if batched at the service's limit" (a trial). Split by the body's bytes, nothing is refused."""
    with LiveServer(serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "sizing.sqlite")) as url:
        sizing = extract(remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.ledger=" +
                                str(tmp_path / "sizing-client.sqlite")), log=quiet, dry_run=True)
    cap = int(12 * sizing.cost["bytes"] / 90 * 1.15)  # a call's 12 views fit in their bytes, not in base64
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite", max_request_bytes=cap)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url)
        dry = extract(cfg, log=quiet, dry_run=True)
        res = extract(cfg, log=quiet)
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert res.complete and usage["halvings"] == 0 and usage["refused"] == 0
    assert_same(local, arrays(cfg.out))
    assert dry.cost["requests"] + dry.cost["text_requests"] == usage["requests"] > 8 + 2
    # packed at the limits: no fewer than the base64 bodies need, no more than extraction's own requests
    assert 4 * dry.cost["bytes"] / 3 / cap <= dry.cost["requests_at_batch_limit"] <= dry.cost["requests"]


def test_a_request_limit_below_one_views_size_is_said_before_anything_is_paid(tmp_path, tiny_teacher_cfg,
                                                                              tiny_teacher, key_env):
    """A server limit smaller than some views: the dry run refused at once, but the extraction paid for
    381 queries, then stopped at the first view past it (a trial). Said when the teacher is built."""
    import warnings

    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite", max_request_bytes=2000)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url)
        with pytest.warns(UserWarning, match=r"takes requests of at most 2,000 bytes, and one 32 px view sent as PNG can "
                                             r"take up to 4,\d{3} .*`extract --dry-run` checks every view first"):
            build_teacher(cfg.teacher)
    with LiveServer(serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "s2.sqlite")) as url:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default limit (32 MB) holds any view: nothing said
            build_teacher(remote(tmp_path, "r2.zarr", tiny_teacher_cfg, "embedcache", url).teacher)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_bodys_size_is_counted_exactly(protocol, tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """What extraction counts against a byte limit is the body it sends, to the byte (json.dumps of the
    protocol's own request, against the counted size), for images and texts."""
    rng = np.random.default_rng(0)
    with LiveServer(service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path)) as url:
        t = build_teacher(remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url).teacher)
    for modality in ("image", "text"):
        start, adds = t._body_size(modality)
        for n in (1, 2, 5):
            if modality == "image":
                payloads = [rng.bytes(int(rng.integers(1, 500))) for _ in range(n)]
                _, body = t.protocol.image_request(t.model, payloads, t.cfg.image_format, t.cfg.dimensions)
            else:
                payloads = ['a "quoted" caf\u00e9 of a newt\n'.encode("utf-8")[:int(rng.integers(1, 30))].decode(
                    "utf-8", "ignore").encode("utf-8") for _ in range(n)]
                _, body = t.protocol.text_request(t.model, [p.decode("utf-8") for p in payloads], t.cfg.dimensions)
            assert start + sum(adds(p) for p in payloads) == len(json.dumps(body).encode()), (modality, n)


def test_a_dry_run_says_the_one_query_that_learnt_the_dimension(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """An openai-style service does not say its dimension: building the teacher pays one text to learn
    it. "Write and pay nothing" hid that; the dry run now says it, and teacher.dimensions skips it."""
    app = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    with LiveServer(app) as url:
        dry = extract(remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url), log=quiet, dry_run=True)
        assert dry.cost["probe_queries"] == 1 == charged(app)[0]
        dry = extract(remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url, "teacher.dimensions=32"), log=quiet,
                      dry_run=True)
        assert "probe_queries" not in dry.cost and charged(app)[0] == 1
    from embedcache.cli.data import _cost_lines

    assert _cost_lines({"probe_queries": 1, "images": 3})[0].startswith("paid now: 1 query to learn the service's")
    # a shard's dry run counts the prompts, which one shard pays for: summed over the shards, say to count them once
    shard = _cost_lines({"images": 3, "text_texts": 40}, shards=2)
    assert shard[1].startswith("prompts: 40 to pay for") and shard[1].endswith(
        "once for the whole store, by the shard that finishes it: count them once over the 2 shards' dry runs")
    assert "shard" not in shard[0] and "shard" not in " ".join(_cost_lines({"images": 3, "text_texts": 40}))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_faults_change_nothing_and_nothing_answered_is_sent_again(protocol, tmp_path, local, tiny_teacher_cfg,
                                                                   tiny_teacher, key_env):
    inner = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path)
    every = ["429-ms", "429-date", "429-none", "500", "drop", "lost"]
    faulty = Faults(inner, {"500": 0.2, "drop": 0.05, "429-none": 0.05}, seed=1, hold=1.0, script=every)
    log = tmp_path / "server.log"
    with LiveServer(faulty, log) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32", "teacher.timeout=0.6")
        res = extract(cfg, log=quiet)
    assert res.complete and all(faulty.count.get(f) for f in every)
    assert_same(local, arrays(cfg.out))
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert usage["retries"] >= len(every) and usage["lost_answers"] >= 2
    assert resent_after_answer(tmp_path / "client.sqlite") == 0
    total, doubles = charged(inner)
    if protocol == "embedcache":  # idempotency keys: the server charged every distinct input exactly once
        assert doubles == 0 and total == 90 + 24
    else:  # no idempotency: only the lost answers (counted as possibly paid) were charged again
        assert doubles <= usage["possibly_paid"]
    assert not files_containing([tmp_path], KEY.encode())
    assert log.stat().st_size > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_5xx_after_the_service_charged_is_counted_as_possibly_paid(protocol, tmp_path, local, tiny_teacher_cfg,
                                                                      tiny_teacher, key_env):
    """A gateway's 502 in place of an answer the service had charged was counted as not charged: the
    store's books said 24 queries where the service billed 47, and teacher.max_queries was overrun by
    15, exit 0 (a trial). A 5xx may come after the charge: counted as possibly paid, as a lost answer is."""
    inner = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path)
    faulty = Faults(inner, script=["500-after", None, "500-after", None, "500-after"])
    with LiveServer(faulty) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32")
        assert extract(cfg, log=quiet).complete
    assert faulty.count["500-after"] == 3
    assert_same(local, arrays(cfg.out))
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    total, doubles = charged(inner)
    if protocol == "embedcache":  # the resend under the same idempotency key was a free replay of its own charge
        assert doubles == 0 and usage["queries"] == total == 90 + 24, (usage, total)
    else:  # charged again on the resend: the books never below the bill
        assert doubles > 0 and usage["queries"] + usage.get("possibly_paid", 0) >= total, (usage, total)


def test_an_overloaded_services_503_is_not_counted_as_paid(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """A 503 turns a request away before any work: counted as possibly paid, it claimed the budget again at each
    retry, and a store whose limit was its bill stopped short (a review). Without an idempotency key it
    cannot be settled later, so it is counted as what it is: a refusal."""
    inner = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    faulty = Faults(inner, script=["503", None, "503", None, "503"])
    with LiveServer(faulty) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url, "teacher.dimensions=32",
                     "teacher.max_queries=114")
        assert extract(cfg, log=quiet).complete  # a limit of exactly the bill
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert faulty.count["503"] == 3 and usage["queries"] == charged(inner)[0] == 114
    assert not usage.get("possibly_paid") and not usage.get("lost_answers")


def test_which_error_answers_may_come_after_a_charge():
    from embedcache.teachers.remote.client import perhaps_charged

    assert perhaps_charged(502, {}) and perhaps_charged(504, {}) and perhaps_charged(500, {})
    assert perhaps_charged(520, {}) and perhaps_charged(524, {})  # Cloudflare's, once the origin worked (a review)
    assert not perhaps_charged(503, {}) and not perhaps_charged(529, {}) and not perhaps_charged(429, {})
    assert not perhaps_charged(521, {}) and not perhaps_charged(522, {})  # the gateway never reached the service
    assert not perhaps_charged(500, {"retry-after": "2"}) and not perhaps_charged(502, {"retry-after-ms": "30"})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_too_large_halves_the_batch(protocol, tmp_path, local, tiny_teacher_cfg, tiny_teacher, key_env):
    if protocol == "embedcache":
        app = Faults(service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path), script=["413"])
    else:  # the service takes fewer inputs than the client believes, and says so
        app = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path, limit=6)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32")
        assert extract(cfg, log=quiet).complete
    with embedcache.open_store(cfg.out) as s:
        assert s.manifest["teacher_usage"]["halvings"] >= 1
    assert_same_up_to_batching(local, arrays(cfg.out))


@pytest.mark.parametrize("how", ["count", "dim"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_wrong_answer_stops_with_one_line_and_writes_nothing(protocol, how, tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                key_env):
    if protocol == "embedcache":
        app = Tamper(service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path), how)
    else:
        app = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path, tamper=how)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32")
        with pytest.raises(RemoteError) as err:
            extract(cfg, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "nothing was written" in msg and KEY not in msg
    assert ("dimension" in msg) if how == "dim" else ("asked for 12" in msg)
    assert err.value.exit_code == 4  # the service's answer, not the user's settings (2)
    with Store(cfg.out) as st:
        assert not st.blocks_done().any()
    with sqlite3.connect(str(tmp_path / "client.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM entries WHERE status='done'").fetchone()[0] == 0
        assert db.execute("SELECT status FROM requests").fetchall() == [("bad",)]


@pytest.mark.parametrize("protocol", ["embedcache", "openai"])
def test_an_answer_from_another_model_is_refused_and_nothing_of_it_is_kept(protocol, tmp_path, local, tiny_teacher_cfg,
                                                                           tiny_teacher, key_env):
    """A service whose answer named another model mid-run (a vendor moving an alias) was stored beside the
    first model's answers with exit 0. Refused in one line, exit 4 (the service's answer, not a setting),
    by this run, by a rerun whose ledger holds the first model's answers, and by a rerun with another
    ledger (the store's books hold the model); once the service answers from its first model again, the
    store completes and equals the local teacher's."""
    swap = ModelSwap(service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path), after=1)
    with LiveServer(swap) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32", "block_rows=4")
        fresh_ledger = replace(cfg, teacher=replace(cfg.teacher, ledger=str(tmp_path / "fresh.sqlite")))
        kept_first = None
        for run in (cfg, cfg, fresh_ledger):
            with pytest.raises(BadAnswer) as err:
                extract(run, log=quiet)
            msg = str(err.value)
            assert "\n" not in msg and KEY not in msg and "'other-model-v2'" in msg and "nothing was written" in msg
            assert err.value.exit_code == 4
            with sqlite3.connect(str(tmp_path / "client.sqlite")) as db:  # the first model's answers, and only those
                kept = db.execute("SELECT modality, COUNT(*) FROM entries WHERE status='done' GROUP BY modality").fetchall()
            assert kept == (kept_first or kept) and kept[0][1] > 0, kept  # the first answers kept; no later one
            kept_first = kept
        with Store(cfg.out) as st:
            assert st.blocks_done().any()  # so the last refusal came from the store's books
        swap.on = False
        assert extract(cfg, log=quiet).complete
        swap.on = True  # a text query of the finished store is held to its model too (it was scored unchecked)
        with pytest.raises(BadAnswer, match="'other-model-v2'"):
            embedcache.open_store(cfg.out).nearest_images("a photo of something new")
    assert_same_up_to_batching(local, arrays(cfg.out))
    said = embedcache.open_store(cfg.out).summary()["teacher_usage"]  # inspect names the model the answers came from
    assert f"answers from model '{MODELS[protocol] or 'embedcache'}'" in said, said


@pytest.mark.parametrize("protocol", ["embedcache", "openai"])
def test_a_store_begun_after_the_model_moved_takes_no_answer_of_the_old_one(protocol, tmp_path, tiny_teacher_cfg,
                                                                           tiny_teacher, key_env):
    """After the alias moved, a new store of other images took its class texts from the ledger's answers
    of the old model and its views from the new one: refused, and before any view is paid for (it was
    found only at the prompts, with every view paid); with another ledger every answer comes from the new
    model, and the store completes."""
    swap = ModelSwap(service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path), after=10**9)
    with LiveServer(swap) as url:
        assert extract(remote(tmp_path, "a.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32"),
                       log=quiet).complete
        swap.after = 0  # every answer from now on names the new model
        b = remote(tmp_path, "b.zarr", tiny_teacher_cfg, protocol, url, "teacher.dimensions=32", "dataset.seed=5")
        with pytest.raises(BadAnswer, match=r"from model '.+', where this store's other answers came from '.+': the two "
                                            r"would mix in one store") as err:
            extract(b, log=quiet)
        assert "'other-model-v2'" in str(err.value) and f"'{MODELS[protocol] or 'embedcache'}'" in str(err.value)
        with Store(b.out) as st:  # found from the ledger's answers to its prompts before any block was paid
            assert not st.blocks_done().any()
        own = replace(b, out=str(tmp_path / "b2.zarr"), teacher=replace(b.teacher, ledger=str(tmp_path / "own.sqlite")))
        assert extract(own, log=quiet).complete


def test_shards_that_began_apart_from_two_models_do_not_finish_the_store(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                         key_env, monkeypatch):
    """Two shards that open a fresh store before either writes its books each hold their own first answer's
    model: with the alias moved between those answers, each shard's blocks came from another model and the
    store finished mixed, exit 0 (the books kept the last entry's name). The store's books are held to one
    model at its finish: refused before the prompts are paid for, the store left unfinished."""
    swap = ModelSwap(service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path), after=10**9)
    with LiveServer(swap) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url, "teacher.dimensions=32", "block_rows=4",
                     "num_shards=2")
        assert not extract(replace(cfg, shard=0), log=quiet).complete
        swap.after = 0  # the second shard's first answer names the new model, its books still unread (the race)
        monkeypatch.setattr("embedcache.extract.models_in_store", lambda *a: None)
        other = replace(cfg, shard=1, teacher=replace(cfg.teacher, ledger=str(tmp_path / "own.sqlite")))
        with pytest.raises(BadAnswer) as err:
            extract(other, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and KEY not in msg and err.value.exit_code == 4
    assert "'other-model-v2'" in msg and f"'{MODELS['openai']}'" in msg and "Delete" in msg, msg
    with Store(cfg.out) as st:
        assert st.blocks_done().all() and not st.complete and not st.has("text/names/emb")


def test_a_dry_run_refuses_what_its_run_would_refuse_for_another_model(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                       key_env):
    """A dry run of a store begun under one model, with a ledger holding the moved alias's answers to the
    rest, priced those views and prompts as free ledger hits; the run itself then refused them (exit 4)."""
    swap = ModelSwap(service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path), after=10**9)
    with LiveServer(swap) as url:
        cfg = remote(tmp_path, "p.zarr", tiny_teacher_cfg, "openai", url, "teacher.dimensions=32", "block_rows=4",
                     "num_shards=2")
        assert not extract(replace(cfg, shard=0), log=quiet).complete  # its books: the first model
        swap.after = 0
        moved = replace(cfg.teacher, ledger=str(tmp_path / "moved.sqlite"))
        assert extract(replace(cfg, out=str(tmp_path / "q.zarr"), num_shards=None, teacher=moved), log=quiet).complete
        rest = replace(cfg, shard=1, teacher=moved)
        with pytest.raises(BadAnswer, match="'other-model-v2'") as err:
            extract(rest, log=quiet, dry_run=True)
        assert err.value.exit_code == 4
        with pytest.raises(BadAnswer, match="'other-model-v2'"):
            extract(rest, log=quiet)


@pytest.mark.parametrize("how", ["zero", "strings", "notjson"])
def test_an_unusable_answer_is_refused_in_one_line_and_counted_as_paid(how, tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                      key_env):
    """An all-zero vector was stored (and cached in the ledger for every later store); a vector of
    strings or a 200 that is not JSON ended in a traceback, or was paid and counted nowhere."""
    app = Tamper(service_app("embedcache", tiny_teacher_cfg, tiny_teacher, tmp_path), how)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.dimensions=32")
        with pytest.raises(RemoteError) as err:
            extract(cfg, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "nothing was written" in msg and KEY not in msg, msg
    assert err.value.exit_code == 4
    with Store(cfg.out) as st:
        assert not st.blocks_done().any() and st.usage()["queries"] == 12  # the spoilt answer was paid
    with sqlite3.connect(str(tmp_path / "client.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM entries WHERE status='done'").fetchone()[0] == 0
        assert db.execute("SELECT status FROM requests").fetchall() == [("bad",)]


def test_budget_stops_at_a_block_boundary_then_the_same_store_completes(tmp_path, local, tiny_teacher_cfg,
                                                                        tiny_teacher, key_env):
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=40")
        conf = config_file(tmp_path, cfg)
        dry = extract_cli(conf, "--dry-run")
        assert dry.exit_code == 0 and "30 images x 3 views = 90 views to encode" in dry.output, dry.output
        assert "views: 90 to pay for" in dry.output and "prompts: 24 to pay for" in dry.output
        assert not Path(cfg.out).exists() and charged(app)[0] == 0
        assert ("budget: this extraction needs 114 more queries and this store has sent 0 of teacher.max_queries=40: "
                "it would stop before finishing; rerun with teacher.max_queries >= 114 to finish") in dry.output
        res = extract_cli(conf)
        assert res.exit_code == 3, res.output
        line = res.output.strip().splitlines()[-1]
        # 3 calls of 12 views were paid (36 <= 40); 54 views and 24 prompts are left
        assert line.startswith("error: query budget reached: this store has sent 36 queries of teacher.max_queries=40")
        assert "finishing the store needs 78 more queries" in line and "teacher.max_queries >= 114" in line
        with Store(cfg.out) as st:
            assert st.blocks_done().tolist() == [True, False, False, False] and not st.complete
        assert charged(app)[0] == 36
        # the budget is the store's, over every call: the same command again pays nothing more (each
        # call spent up to its limit afresh: 36 + 36 + ... on a fixed budget of 40)
        again = extract_cli(conf)
        assert again.exit_code == 3 and charged(app)[0] == 36, again.output
        assert "this store has sent 36 queries of teacher.max_queries=40 (every extract call and shard" in again.output
        assert "teacher.max_queries >= 114" in again.output
        dry = extract_cli(conf, "--dry-run")  # the store's sent queries count; the partial block's are free
        assert "needs 78 more queries and this store has sent 36 of teacher.max_queries=40" in dry.output, dry.output
        dry = extract_cli(conf, "--dry-run", "--set", "teacher.max_queries=114")
        assert "sent 36 of teacher.max_queries=114: within it (0 to spare)" in dry.output, dry.output
        from embedcache.cli.data import _budget_lines  # nothing left to pay claims nothing: never "would stop"
        assert "within it" in _budget_lines(SimpleNamespace(budget=(30, 36), cost={"images": 0}, shards=1))[0]
        res = extract_cli(conf, "--set", "teacher.max_queries=114")
        assert res.exit_code == 0, res.output
    assert_same(local, arrays(cfg.out))
    assert charged(app) == (90 + 24, 0)  # the partial block's paid views came from the ledger
    # the store's books count both calls: what the stopped one paid too, not only the last
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert "calls_cut_short" not in usage  # each call closed its books, the stopped ones too
    assert usage["queries"] == 90 + 24 and usage["calls"] == 3 and usage["protocol"] == "embedcache"  # the one that paid nothing looked the partial block up
    assert usage["server_reported"]["queries"] == 90 + 24  # the service's own count, summed over both calls too


def test_text_queries_of_a_finished_store_are_held_within_its_budget_and_said_to_be_paid(tmp_path, tiny_teacher_cfg,
                                                                                          tiny_teacher, key_env):
    """A text query of a finished store reloads its paid teacher, which paid for new prompts past the store's
    teacher.max_queries without a word (a review: ten probes billed beyond a spent budget, exit 0). Each new prompt
    is said to be paid and is held within what the store's budget left; a prompt the ledger holds is free."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=116")
        assert extract(cfg, log=quiet).complete and charged(app)[0] == 114
        store = embedcache.open_store(cfg.out)
        with pytest.warns(UserWarning, match=r"text queries of .*r\.zarr are paid queries to http://127\.0\.0\.1:\d+ "
                          r"\(each prompt its ledger has not answered is one\), held within the 2 left of the store's "
                          r"teacher\.max_queries=116 \(counted in the ledger .*client\.sqlite over every reader that "
                          r"uses it; not written to the store's books\)") as said:
            store.nearest_classes("a photo of something new", k=1)
        assert said[0].filename == __file__  # said at the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per reader
            store.nearest_images("a photo of something new", k=1)  # the ledger's answer: free
            store.nearest_images(store.text("name")["prompt"][0], k=1)  # one of the store's own prompts: free
        assert charged(app)[0] == 115
        other = embedcache.open_store(cfg.out)  # another reader (a new notebook, a process) shares the count
        with pytest.warns(UserWarning, match=r"held within the 1 left of the store's teacher\.max_queries=116") as said:
            other.load_teacher()
        assert said[0].filename == __file__
        other.nearest_images("another new one", k=1)
        assert charged(app)[0] == 116
        for reader in (store, other, embedcache.open_store(cfg.out)):
            with pytest.raises(BudgetError) as err, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader.nearest_classes("a third new one", k=1)
            msg = str(err.value)
            assert "\n" not in msg and charged(app)[0] == 116
            assert msg.startswith(f"query budget reached: {cfg.out} has sent 114 queries of teacher.max_queries=116 and "
                                  "its text queries 2 (ledger "), msg
            assert msg.endswith("and the next request needs 1; query with an embedding, or pass a teacher yourself "
                                "(teacher=) to pay past the store's budget"), msg
        assert other.load_teacher() is other.load_teacher()  # kept: no second warning, no second probe


def test_text_queries_take_the_settings_the_store_was_finished_with(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                    key_env):
    """A reader reloaded the paid teacher with the settings of the call that made the store, not of the last
    call (a trial): a store stopped at teacher.max_queries=30 and finished at 644 held its text queries within
    "the 0 left of the store's teacher.max_queries=30", and it asked the service at the first call's URL."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as first:
        with pytest.raises(BudgetError):
            extract(remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", first, "teacher.max_queries=40"),
                    log=quiet)
    with LiveServer(app) as url:  # the same service at another address: the first one is gone
        assert url != first
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=200")
        assert extract(cfg, log=quiet).complete
        store = embedcache.open_store(cfg.out)
        sent = store.manifest["teacher_usage"]["queries"]
        assert store.manifest["config"]["teacher"]["max_queries"] == 40  # what made it; its calls say the rest
        paid = charged(app)[0]
        with pytest.warns(UserWarning, match=rf"paid queries to {url} .*held within the {200 - sent} left of the "
                                             r"store's teacher\.max_queries=200 "):
            store.nearest_classes("a photo of something new", k=1)
        assert charged(app)[0] == paid + 1
        alter_emb(cfg.out, row=5, view=1, col=3)  # a repair asks the service where the store was finished too
        said = []
        assert verify_store(cfg.out, repair=True, progress=False, log=said.append).repaired == 1
        assert not any("resuming at teacher.url" in line for line in said), said  # it said to go back to the first
        moved = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url.replace("127.0.0.1", "localhost"),
                       "teacher.max_queries=200")
        alter_emb(cfg.out, row=5, view=1, col=3)
        said = []
        extract(moved, log=said.append)
        assert any(f"resuming at teacher.url={moved.teacher.url}; the store was last extracted at {url}. " in line
                   for line in said), said
        assert verify_store(cfg.out, progress=False, log=quiet).report.ok


def test_a_reloaded_teacher_takes_its_dimension_from_the_store_not_a_paid_probe(tmp_path, tiny_teacher_cfg,
                                                                                 tiny_teacher, key_env):
    """A service that does not say its dimension (the OpenAI shape) is asked one paid text to learn it, unless
    the ledger knows it. A store's reader reloading the teacher with a ledger that does not (another machine, a
    deleted ledger) paid that probe before the store's budget was attached; the store records the dimension."""
    app = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url, "teacher.max_queries=200")
        assert extract(cfg, log=quiet).complete
        paid = charged(app)[0]
        (tmp_path / "client.sqlite").unlink()  # a ledger that knows nothing of this service
        store = embedcache.open_store(cfg.out)
        with pytest.warns(UserWarning, match="are paid queries"):
            teacher = store.load_teacher()
        assert teacher.embed_dim == tiny_teacher.embed_dim and charged(app)[0] == paid
        store.nearest_classes("a photo of something new", k=1)
        assert charged(app)[0] == paid + 1  # the query itself, within the budget
        (tmp_path / "client.sqlite").unlink()
        assert extract(cfg, log=quiet).skipped  # a rerun: nothing to do, and no probe paid for it either
        assert charged(app)[0] == paid + 1


def test_a_complete_store_reruns_as_nothing_to_do_with_its_service_down(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                         key_env):
    """Rerunning a finished remote store needed the server (exit 75, "rerun to resume" of a complete
    store): with the same settings and images it is nothing to do; with others the server is needed."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=40")
        conf = config_file(tmp_path, cfg)
        assert extract_cli(conf).exit_code == 3  # a budget stop; the store is finished with a raised limit
        assert extract_cli(conf, "--set", "teacher.max_queries=200").exit_code == 0
    again = extract_cli(conf, "--set", "teacher.max_queries=200")  # the finishing command again; the server is gone
    assert again.exit_code == 0 and "already complete and intact" in again.output, again.output
    dry = extract_cli(conf, "--dry-run")
    assert dry.exit_code == 0 and "the store is complete: nothing to encode or pay for" in dry.output, dry.output
    other = extract_cli(conf, "--set", "views.count=2")
    assert other.exit_code == 75 and "cannot reach" in other.output, other.output


def test_a_complete_store_of_a_relative_templates_file_reruns_as_nothing_to_do(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                               key_env, monkeypatch):
    """The manifest records a relative file absolute; compared with the call's relative one, the store
    read as made otherwise, and a rerun with the service down failed (a review)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tpl.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "text.sources=[name,templates]",
                     "text.templates=tpl.txt")
        conf = config_file(tmp_path, cfg)
        assert extract_cli(conf).exit_code == 0
    again = extract_cli(conf)
    assert again.exit_code == 0 and "already complete and intact" in again.output, again.output


def test_a_spent_quota_under_a_limit_not_reached_does_not_ask_to_raise_the_limit(tmp_path, tiny_teacher_cfg,
                                                                                  tiny_teacher, key_env):
    """The service's quota ran out with teacher.max_queries=1000 far from reached: the stop said
    "rerun ... with teacher.max_queries >= 114", which cannot help (a new user's trial)."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(app, script=[None, None, "429-credit"])) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=1000")
        res = extract_cli(config_file(tmp_path, cfg))
    assert res.exit_code == 3, res.output
    line = res.output.strip().splitlines()[-1]
    assert "quota is spent" in line and "finishing the store needs" in line, line
    assert "max_queries" not in line.split("quota is spent")[1], line


def test_a_budget_that_runs_out_in_the_text_stage_says_what_finishing_needs(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                             key_env):
    """The prompts are encoded after the last block, outside the block loop's budget handling: a stop
    there said only "query budget reached", with no cost of finishing and no limit that would."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=100")
        conf = config_file(tmp_path, cfg)
        res = extract_cli(conf)
        assert res.exit_code == 3, res.output
        line = res.output.strip().splitlines()[-1]
        assert "query budget reached" in line and "teacher.max_queries >= 114" in line, line
        with Store(cfg.out) as st:
            assert st.blocks_done().all() and not st.complete
        done = extract_cli(conf, "--set", "teacher.max_queries=114")
        assert done.exit_code == 0, done.output
        assert "images read" not in done.output  # it read none: no "0 images read in 3.0s (0.0 images/s)"
    assert charged(app)[0] == 90 + 24


def test_a_budget_stop_on_an_hdf5_store_says_what_finishing_needs(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """The stop's message read the store's count after the store was closed (for the dry run that
    prices what is left): an HDF5 store ended in a TypeError traceback (a helper's review)."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.h5", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=40")
        conf = config_file(tmp_path, cfg)
        res = extract_cli(conf)
        assert res.exit_code == 3, res.output
        assert "teacher.max_queries >= 114" in res.output.strip().splitlines()[-1], res.output
    assert charged(app)[0] == 36


def test_a_shards_budget_stop_says_it_prices_this_shard_only(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """A shard's stop priced only its own blocks left and named a limit "to resume" as if it finished
    the store (the other shards' blocks still to pay). Pricing the whole store in every shard would
    render it once per shard (shards stop together on a shared budget): it says what it priced."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=40")
        conf = config_file(tmp_path, cfg)
        dry = extract_cli(conf, "--dry-run", "--shard", "0", "--num-shards", "2")
        assert "this shard needs" in dry.output and "a dry run with --num-shards 1 prices the whole store" in dry.output, dry.output
        res = extract_cli(conf, "--shard", "0", "--num-shards", "2")
        assert res.exit_code == 3, res.output
        line = res.output.strip().splitlines()[-1]
        assert "this store has sent 36 queries" in line and "finishing this shard needs" in line, line
        assert "`extract --dry-run --num-shards 1` prices the whole store" in line and "to finish this shard" in line
        whole = extract_cli(conf, "--dry-run", "--num-shards", "1")
        assert "needs 78 more queries and this store has sent 36 of teacher.max_queries=40" in whole.output, whole.output


def test_the_budget_is_claimed_in_the_store_before_requests_go_out(tmp_path):
    """Shards running together each counted what the store had paid when they started (72 charged on a
    budget of 40), and a call killed with -9 left its requests out of the books: claims are written in
    the store under a lock before a request is sent, one count for every process."""
    import threading

    from conftest import block_store
    from embedcache.extract.budget import StoreBudget

    path, _ = block_store(tmp_path, "zarr")
    with Store(path, "a") as st:
        budgets = [StoreBudget(st, 50) for _ in range(6)]  # as six processes would, each with its own lock fd
        refused = []

        def spend(b):
            for _ in range(20):
                try:
                    b(1)
                except BudgetError:
                    refused.append(1)

        threads = [threading.Thread(target=spend, args=(b,)) for b in budgets]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert budgets[0].claimed() == 50 and len(refused) == 6 * 20 - 50
    with Store(path, "a") as again:  # a later call (the first killed after sending) sees every claim
        with pytest.raises(BudgetError, match="this store has sent 50 queries of teacher.max_queries=60 .* needs 12"):
            StoreBudget(again, 60)(12)
        StoreBudget(again, 62)(12)
        assert StoreBudget(again, 0).claimed() == 62


def test_a_second_store_reuses_the_first_ones_views(tmp_path, local, tiny_teacher_cfg, tiny_teacher, key_env):
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        a = remote(tmp_path, "a.zarr", tiny_teacher_cfg, "embedcache", url)
        extract(a, log=quiet)
        # another store of the same views: other blocks and batches, HDF5, one text source
        b = remote(tmp_path, "b.h5", tiny_teacher_cfg, "embedcache", url, "block_rows=16", "batch_size=8",
                   "text.sources=[name]")
        extract(b, log=quiet)
    assert charged(app) == (90 + 24, 0)
    with embedcache.open_store(b.out) as s:
        usage = s.manifest["teacher_usage"]
    assert usage["queries"] == 0 and usage["cache_hits"] == 90 + 3
    assert np.array_equal(arrays(b.out)["image/emb"], local["image/emb"])


def test_a_replay_of_another_clients_charge_is_free_here_not_paid(tmp_path, local, tiny_teacher_cfg, tiny_teacher,
                                                                  key_env):
    """Two stores of the same views, each with its own client ledger, under one API key: the service
    answered the second's requests as free replays (the same idempotency keys), and its books counted
    them as paid (328 queries where the service charged none; every second store's prompts so: a trial)."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        a = remote(tmp_path, "a.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=500")
        extract(a, log=quiet)
        b = remote(tmp_path, "b.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=500",
                   f"teacher.ledger={tmp_path / 'other-client.sqlite'}")
        extract(b, log=quiet)
    assert charged(app) == (90 + 24, 0)
    usage = embedcache.open_store(b.out).manifest["teacher_usage"]
    assert usage["queries"] == 0 and usage["replayed_elsewhere"] == 90 + 24 and not usage.get("replayed_free")
    # the second ledger's totals: nothing paid by it (it said 90 paid inputs, a trial), the replays said as such
    assert usage["ledger"]["paid_inputs"] == 0 and usage["ledger"]["replayed_elsewhere_inputs"] == 90, usage["ledger"]
    assert embedcache.open_store(a.out).manifest["teacher_usage"]["ledger"]["paid_inputs"] == 90
    assert "answered free as replays of another client's requests" in embedcache.open_store(b.out).summary()["teacher_usage"]
    from embedcache.extract.budget import StoreBudget
    with Store(b.out) as st:  # nothing paid: every claim given back
        assert StoreBudget(st, 500).claimed() == 0
    assert_same(local, arrays(b.out))


def test_a_store_resumed_at_another_url_says_the_ledgers_answers_there_are_not_reused(tmp_path, tiny_teacher_cfg,
                                                                                     tiny_teacher, key_env):
    """Resumed at a moved URL of the same service, the views paid at the old one were paid again without
    a word (the ledger keeps answers by URL: 712 queries for a store of 616, a trial). Said, by the dry run too."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=30")
        with pytest.raises(BudgetError):
            extract(cfg, log=quiet)
        moved = replace(cfg, teacher=replace(cfg.teacher, url=url.replace("127.0.0.1", "localhost"), max_queries=None))
        for dry in (True, False):
            said = []
            extract(moved, log=said.append, dry_run=dry)
            assert any(f"resuming at teacher.url={moved.teacher.url}; the store began at {url}. The ledger keeps answers "
                       "by URL" in line for line in said), (dry, said)


def test_kill_9_midway_and_rerun_pays_nothing_twice(tmp_path, local, tiny_teacher_cfg, tiny_teacher):
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, delay=0.15)) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url)
        conf = config_file(tmp_path, cfg)
        env = {**os.environ, KEY_ENV: KEY, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "embedcache.cli", "extract", "--config", str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while charged(inner)[0] < 36:  # three calls of 12 views paid: block 0 done, block 1 under way
                assert proc.poll() is None and time.monotonic() < deadline, "client ended before it could be killed"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        paid_at_kill = charged(inner)[0]
        with Store(cfg.out) as st:
            assert not st.complete
        with embedcache.open_store(cfg.out, require_complete=False) as s:  # inspect said nothing of it (a trial)
            assert s.facts()["teacher_usage"]["calls_cut_short"] == 1
            assert "1 call(s) cut short (killed: what they paid after" in s.summary()["teacher_usage"]
        os.environ[KEY_ENV] = KEY
        try:
            with pytest.warns(UserWarning, match=r"r.zarr: 1 earlier extract call\(s\) ended without closing their "
                                                 r"books \(killed by kill -9 or the OOM killer.*may leave out.*the service's own bill is the exact figure"):
                res = extract(cfg, log=quiet)
        finally:
            del os.environ[KEY_ENV]
    assert res.complete and paid_at_kill < 90
    assert_same(local, arrays(cfg.out))
    assert charged(inner) == (90 + 24, 0)  # nothing the ledger held (or the server answered) was paid again
    # the store's books say what the server billed: the killed call's spending up to its last block is in
    # them, and an answer the server replayed free after the kill is not counted as paid again
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    unbooked = (90 + 24) - usage["queries"]  # at most the views the killed call paid after its last finished block
    assert usage["calls"] == 2 and 0 <= unbooked <= 12 and usage["queries"] >= 90 + 24 - 12, usage
    assert usage["calls_cut_short"] == 1  # said, since the books may be low (the bill is the exact figure)
    assert usage["server_reported"]["queries"] == usage["queries"]
    assert usage.get("replayed_free", 0) == 0  # the killed call's cut-off request, replayed now, is paid once here


def _stopped_with_the_fourth_request_out(cfg: ExtractConfig) -> None:
    """An extraction stopped by Ctrl-C while its fourth request is out, after the service charged it."""
    teacher = build_teacher(cfg.teacher)
    post, sends = teacher.transport.http.post, []

    def stopped_on_the_fourth(*args, **kw):  # the service answers (charged); Ctrl-C lands before it is read
        resp = post(*args, **kw)
        sends.append(resp)
        if len(sends) == 4:
            raise KeyboardInterrupt
        return resp

    teacher.transport.http.post = stopped_on_the_fourth
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=teacher, log=quiet)


def test_a_request_out_at_ctrl_c_resent_in_other_batches_is_counted_once_as_possibly_paid(tmp_path, tiny_teacher_cfg,
                                                                                          tiny_teacher, key_env):
    """Resumed with another batch size, the cut-off request's inputs go out under new keys and are
    charged again: the stopped call counted them as possibly paid, and the resume does not count them a
    second time as possibly paid twice (the books' paid + possibly paid is the bill)."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url)
        _stopped_with_the_fourth_request_out(cfg)
        with pytest.warns(UserWarning, match=r"may be paid twice \(counted as possibly paid by the call cut off\)"):
            extract(replace(cfg, batch_size=2), log=quiet)
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert charged(app)[1] == 12 and usage["possibly_paid"] == 12 and not usage.get("possibly_paid_twice")
    assert usage["queries"] + usage["possibly_paid"] == charged(app)[0]


@pytest.mark.parametrize("protocol", ["embedcache", "openai"])
def test_a_request_out_at_ctrl_c_is_in_the_stores_books_and_a_resume_settles_it(protocol, tmp_path, local,
                                                                                tiny_teacher_cfg, tiny_teacher, key_env):
    """Ctrl-C landed while a request was out, after the service charged it: the store's books said 36
    queries paid where the service had charged 48, with no word of the other 12, until a resume (a
    trial). They are possibly paid; the resume's answer under the same idempotency key settles them as
    paid once. To a service without idempotency keys the resume's send may be a second charge: the
    first stays possibly paid, and is not counted a second time as possibly paid twice."""
    app = service_app(protocol, tiny_teacher_cfg, tiny_teacher, tmp_path)
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, protocol, url, "teacher.max_queries=500")
        _stopped_with_the_fourth_request_out(cfg)
        at_stop = charged(app)[0]
        with Store(cfg.out) as st:
            books = st.usage()
        assert books["queries"] == 36 and books["possibly_paid"] == 12 and len(books["lost_requests"]) == 1
        assert at_stop - books["queries"] - books["possibly_paid"] in (0, 1)  # (openai: and a dimension probe)
        res = extract(cfg, log=quiet)  # the resume replays the request cut off
    usage = embedcache.open_store(cfg.out).manifest["teacher_usage"]
    assert res.complete
    assert_same(local, arrays(cfg.out))
    if protocol == "embedcache":  # replayed free: paid once, counted once, as paid
        assert charged(app) == (90 + 24, 0)
        assert usage["queries"] == 90 + 24 and usage["possibly_paid"] == 0 and usage["replayed_free"] == 12
        assert "lost_requests" not in usage or not usage["lost_requests"]
        from embedcache.extract.budget import StoreBudget
        with Store(cfg.out) as st:  # the replay's claim given back: it proved the stopped call's charge
            assert StoreBudget(st, 500).claimed() == 90 + 24
    else:  # charged again: 12 paid twice, counted as paid in the resume and possibly paid in the stop
        assert usage["queries"] == 90 + 24 and usage["possibly_paid"] == 12 and not usage.get("possibly_paid_twice")


def test_identical_inputs_in_a_call_are_sent_once(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url).teacher
        t = build_teacher(cfg)
        x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
        out = t.encode_pixels(torch.cat([x, x[:2], x]))  # 8 views, 3 distinct
        assert charged(app) == (3, 0) and t.usage()["deduplicated"] == 5
        assert torch.equal(out[:3], out[5:]) and torch.equal(out[3:5], out[:2])
        assert torch.equal(out[:3].half(), tiny_teacher.encode_pixels(x).half())
        t.encode_pixels(x)  # all in the ledger now
        assert charged(app) == (3, 0) and t.usage()["cache_hits"] == 3
        # a dry run counts each input once, paid or free: 3 distinct views answered free, 5 repeats
        # (it said 8 answered free after saying 3 to pay for: the repeats were counted on one side only)
        cost = t.cost(torch.cat([x, x[:2], x]))
        assert cost["ledger_hits"] == 3 and cost["images"] == 0 and cost["duplicates"] == 5
        fresh = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
        cost = t.cost(torch.cat([fresh, fresh]))
        assert cost["ledger_hits"] == 0 and cost["images"] == 2 and cost["duplicates"] == 2
        from embedcache.cli.data import _cost_lines
        assert "(5 repeats of an input counted already, each paid once)" in _cost_lines({"images": 0, "ledger_hits": 3,
                                                                                          "duplicates": 5})[0]
        # the same prompt in two text sources (the name prompt is also a template), on an empty ledger: a
        # repeat, not an answer of the ledger (the dry run said "answered free by the ledger")
        t.begin_plan()
        first = t.text_cost(["a photo of a newt.", "a newt"])
        again = t.text_cost(["a photo of a newt.", "a sketch of a newt."])
        assert first["texts"] == 2 and again["texts"] == 1 and again["ledger_hits"] == 0 and again["duplicates"] == 1
        # and the books say so as the dry run does: a repeat of a prompt this run paid for, not a ledger answer
        # (inspect said "7 answered free by the ledger" of the name prompts met again among the templates: a trial)
        before = t.usage()
        t.encode_text(["a photo of a newt.", "a newt"])
        t.encode_text(["a photo of a newt.", "a sketch of a newt."])
        after = t.usage()
        assert after["texts"] - before["texts"] == 3 and after["cache_hits"] == before["cache_hits"]
        assert after["deduplicated"] - before["deduplicated"] == 1


def test_a_lost_answer_counts_against_the_budget(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, script=["lost"], hold=1.5)) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=20").teacher
        t = build_teacher(cfg)
        with pytest.raises(BudgetError, match=r"paid 0 of teacher.max_queries=20 \(12 more possibly paid"):
            t.encode_pixels(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8))
    with sqlite3.connect(str(tmp_path / "client.sqlite")) as db:
        assert db.execute("SELECT status, lost FROM requests").fetchall() == [("pending", 1)]
        assert db.execute("SELECT COUNT(*) FROM entries WHERE status='pending'").fetchone()[0] == 12


def test_a_dry_run_says_which_inputs_a_cut_off_request_may_get_free(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                     key_env):
    """After a stop, a dry run priced a request the service had charged (its answer lost) as all to pay;
    the resume got it replayed free under its idempotency key and paid less (a new user's trial)."""
    from embedcache.cli.data import _cost_lines

    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    views = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(Faults(inner, script=["lost"], hold=1.5)) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=20").teacher
        with pytest.raises(BudgetError):
            build_teacher(cfg).encode_pixels(views)  # charged, the answer lost: pending
        cost = build_teacher(replace(cfg, max_queries=None)).cost(torch.cat([views, views[:0]]))
        stop = build_teacher(cfg).budget_message(cost)  # what a call stopped by the budget says, as the dry run
    assert cost["images"] == 12 and cost["replayable"] == 12  # priced, and said to come back free where kept
    assert stop.startswith("finishing the store needs 12 more queries (0 if the service answers the 12 a stopped call "
                           "sent as free replays"), stop  # it said only 12 (a money audit)
    line = _cost_lines(cost)[0]
    assert "12 of them in requests a stopped call sent, which the service answers again free" in line, line
    # the budget line gives both figures: it counted them as to pay, the resume then needed 48 fewer (a trial)
    from embedcache.cli.data import _budget_lines
    budget = _budget_lines(SimpleNamespace(budget=(50, 20), cost=cost, shards=1))[0]
    assert ("needs 12 more queries (0 if the service answers the 12 a stopped call sent as free replays, as it does for "
            "those it charged while it keeps them) and this store has sent 20 of teacher.max_queries=50") in budget, budget


def test_a_resend_after_a_lost_answer_is_claimed_against_the_stores_budget(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                           key_env):
    """A request is claimed once before it goes out; its resend after a lost answer (which may be charged
    again) was checked against this call's spending only, so the store's total could pass its limit."""
    from conftest import block_store
    from embedcache.extract.budget import StoreBudget

    path, _ = block_store(tmp_path, "zarr")
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, script=["lost"], hold=1.5)) as url, Store(path, "a") as st:
        StoreBudget(st, 100)(10)  # an earlier call of this store sent 10
        t = build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=30").teacher)
        t.budget_from(StoreBudget(st, 30))
        with pytest.raises(BudgetError, match="this store has sent 22 queries of teacher.max_queries=30 .* needs 12"):
            t.encode_pixels(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8))


def test_a_request_that_never_goes_out_or_is_refused_keeps_no_claim(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """Requests were claimed before the rate limiter's wait: one stopped there (Ctrl-C) was never sent,
    and its claim stayed, so a rerun at the same teacher.max_queries stopped short, the store "having
    sent" queries the service never saw (a trial: claimed 55, billed 47). A request refused as too
    large kept its claim while its halves claimed theirs: counted twice."""
    from conftest import block_store
    from embedcache.extract.budget import StoreBudget

    path, _ = block_store(tmp_path, "zarr")
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    views = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(Faults(inner, script=["413"])) as url, Store(path, "a") as st:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=100").teacher
        t, budget = build_teacher(cfg), StoreBudget(st, 100)
        t.budget_from(budget)

        def stopped(tokens=0.0):
            raise KeyboardInterrupt

        real, t.transport.limiter.acquire = t.transport.limiter.acquire, stopped
        with pytest.raises(KeyboardInterrupt):
            t.encode_pixels(views)
        assert budget.claimed() == 0 and charged(inner) == (0, 0)
        t.transport.limiter.acquire = real
        t.encode_pixels(views)  # refused whole as too large (413), then sent in halves
        assert budget.claimed() == 12 == charged(inner)[0]
        # a stop while the request is out (a second Ctrl-C) keeps its claim: the service may have charged it
        post = t.transport.http.post

        def answered_then_stopped(*args, **kw):
            post(*args, **kw)
            raise KeyboardInterrupt

        t.transport.http.post = answered_then_stopped
        with pytest.raises(KeyboardInterrupt):
            t.encode_pixels(views + 1)
        # (a review: it was given back, 12 claimed against 18 billed; batches are of 6 since the 413)
        assert budget.claimed() == 18 == charged(inner)[0]

def test_an_answer_lost_then_replayed_free_is_counted_once_as_paid(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """The service charged the request, its answer was lost (possibly paid), the retry under the same
    idempotency key is answered as a free replay, which proves the charge: counted once, as paid. It
    stayed "possibly paid" (a trial's manifest said 8 queries against a bill of 168), and the store's
    budget held the resend's claim too (a job stopped at half its limit)."""
    from conftest import block_store
    from embedcache.extract.budget import StoreBudget

    path, _ = block_store(tmp_path, "zarr")
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, script=["lost", "lost"], hold=1.5)) as url, Store(path, "a") as st:
        t = build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=100").teacher)
        budget = StoreBudget(st, 100)
        t.budget_from(budget)
        t.encode_pixels(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8))
        assert budget.claimed() == 12  # the request's own claim; the resends' were released
    s = t.transport.stats
    assert (s.possibly_paid, s.replayed_free, s.queries, s.images, s.spent()) == (0, 12, 12, 12, 12)
    assert s.lost_answers == 2 and charged(inner) == (12, 0)
    assert s.server_usage["queries"] == 12  # the service's own count of the charge (its first answer was lost)


def test_a_lost_send_the_service_never_charged_settles_when_its_resend_is_answered(tmp_path, tiny_teacher_cfg,
                                                                                 tiny_teacher, key_env):
    """A send that timed out before the service took it (a server paused a few seconds) stayed "possibly
    paid" for good, with its resend's budget claim, though the resend was answered as the first charge
    under the same idempotency key (a trial: possibly_paid 12, claimed 264 against a bill of 252). The
    service charges a key once, so any answer under it settles the lost sends."""
    from conftest import block_store
    from embedcache.extract.budget import StoreBudget

    path, _ = block_store(tmp_path, "zarr")
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, script=["stall"], hold=1.5)) as url, Store(path, "a") as st:
        t = build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=100").teacher)
        budget = StoreBudget(st, 100)
        t.budget_from(budget)
        t.encode_pixels(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8))
        assert budget.claimed() == 12 == charged(inner)[0]
    s = t.transport.stats
    assert (s.lost_answers, s.possibly_paid, s.replayed_free, s.queries) == (1, 0, 0, 12)

def test_a_cut_off_request_resent_in_other_batches_is_counted_as_possibly_paid_twice(tmp_path, tiny_teacher_cfg,
                                                                                     tiny_teacher, key_env):
    """A request whose answer was lost is replayed free only whole, under its own idempotency key; a
    resumed run that batches its inputs otherwise (batch_size changed) sends them under a new key and
    the service charges them again. That was silent; it is counted and said."""
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    views = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(Faults(inner, script=["lost"], hold=1.5)) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.max_queries=20").teacher
        with pytest.raises(BudgetError):
            build_teacher(cfg).encode_pixels(views)  # answered (charged) but the answer was lost: pending
        again = build_teacher(replace(cfg, max_queries=None))
        # the dry run says it first (it priced them as any other input, without a word: a trial)
        cost = again.cost(views[:6])
        assert (cost["images"], cost["replayable"], cost["resent_apart"], cost["resent_without_key"]) == (6, 0, 6, 0)
        from embedcache.cli.data import _cost_lines
        assert ("6 of them in requests a stopped call sent, going out now in other requests (was batch_size changed?): "
                "paid twice if the service charged them then; the batch size the store began with replays them free"
                ) in _cost_lines(cost)[0]
        with pytest.warns(UserWarning, match="may be paid twice"):
            again.encode_pixels(views[:6])  # half of the cut-off request, in a batch of its own
    assert again.transport.stats.possibly_paid_twice == 6 and charged(inner) == (18, 6)


def test_a_cut_off_request_replayed_to_a_service_without_idempotency_keys_is_counted_as_possibly_paid_twice(
        tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """OpenAI's and Cohere's embedding APIs take no idempotency key: a request a stopped run sent (and
    the service charged) is charged again when the resumed run replays it. That was counted as paid
    once, by nobody as a double, and the budget allowed it; it is counted and said."""
    inner = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    views = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(inner) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "openai", url).teacher
        first = build_teacher(cfg)
        post = first.transport.post

        def killed_once_answered(*args, **kw):  # the service charged and answered; the run died before storing it
            post(*args, **kw)
            raise KeyboardInterrupt

        first.transport.post = killed_once_answered
        with pytest.raises(KeyboardInterrupt):
            first.encode_pixels(views)
        again = build_teacher(cfg)
        cost = again.cost(views)
        assert (cost["images"], cost["replayable"], cost["resent_apart"], cost["resent_without_key"]) == (12, 0, 0, 12)
        from embedcache.cli.data import _cost_lines
        assert ("12 of them in requests a stopped call sent, going out again to a service that takes no idempotency "
                "key: paid twice if it charged them then") in _cost_lines(cost)[0]
        with pytest.warns(UserWarning, match="takes no idempotency key.*may be paid twice"):
            again.encode_pixels(views)  # the same request, replayed whole
    assert again.transport.stats.possibly_paid_twice == 12 and charged(inner)[1] == 12  # (and a dimension probe)


def _two_processes(tmp_path, tiny_teacher_cfg, url):
    """Two remote teachers (openai protocol, requests of 4) sharing a ledger as two processes would,
    the first's requests held in flight 0.4 s: (first, second, an event set once the first sends)."""
    import threading

    from embedcache.teachers.remote.ledger import Ledger

    cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "openai", url, "teacher.request_batch=4").teacher
    first, second = build_teacher(cfg), build_teacher(cfg)
    first.ledger = first.transport.ledger = Ledger(tmp_path / "client.sqlite", owner="another-process")
    in_flight, post = threading.Event(), first.transport.post

    def slow(*args, **kw):
        in_flight.set()
        time.sleep(0.4)
        return post(*args, **kw)

    first.transport.post = slow
    return first, second, in_flight


def test_inputs_another_live_process_is_sending_are_waited_for_not_paid_twice(tmp_path, tiny_teacher_cfg, tiny_teacher,
                                                                              key_env):
    """Two stores of the same images extracted at once, sharing a ledger: the second sent the inputs the
    first had in flight (pending) and the service charged them twice (102 of 216, without a word). It
    waits for the live owner's answer instead; a request cut off by a kill (its owner gone) is replayed."""
    import threading

    inner = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    views = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(inner) as url:
        from embedcache.teachers.remote.ledger import Ledger

        # three requests of 4 each: the two calls go through the same inputs request by request
        first, second, in_flight = _two_processes(tmp_path, tiny_teacher_cfg, url)
        probes = charged(inner)[0]
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("first", first.encode_pixels(views)))
        worker.start()
        assert in_flight.wait(10)
        got = second.encode_pixels(views)  # waits for each of the first one's answers in turn
        worker.join(10)
        torch.testing.assert_close(got, out["first"])
        assert charged(inner) == (probes + 12, 0) and second.transport.stats.queries == 0
        assert second.transport.stats.image_cache_hits == 12
        # a pending request is waited for while its owner lives; once it is gone (a kill -9 releases its
        # lock and leaves the file) it is an earlier run's cut-off request, replayed
        other = Ledger(tmp_path / "client.sqlite", owner="a-third-process")
        other.begin("r-dead", "ctx", "image", [("k-dead", 10)])
        assert second.ledger.held_elsewhere(["k-dead", "k-none"]) == ["k-dead"]
        os.close(other._owner_fd)  # killed: the lock is released, its file stays
        assert second.ledger.held_elsewhere(["k-dead"]) == [] and not (other.owners / other.owner).exists()
        # this process's own pending requests (a call stopped here, rerun in the same session) are never waited for
        Ledger(tmp_path / "client.sqlite").begin("r-mine", "ctx", "image", [("k-mine", 10)])
        assert second.ledger.held_elsewhere(["k-mine"]) == []


def test_a_request_begun_elsewhere_between_the_check_and_the_send_is_waited_for(tmp_path, tiny_teacher_cfg,
                                                                                tiny_teacher, key_env):
    """Checking for inputs another process is sending and writing this request pending were two steps:
    a process that began the same inputs between them was not seen, and both paid for them. Writing
    the request refuses inputs another live process has begun (or answered) since, and waits for them."""
    import threading

    from embedcache.teachers.remote.ledger import Ledger

    a = Ledger(tmp_path / "unit.sqlite", owner="process-a")
    b = Ledger(tmp_path / "unit.sqlite", owner="process-b")
    assert a.begin("r1", "ctx", "image", [("k1", 10), ("k2", 10)]) == []
    assert b.begin("r1", "ctx", "image", [("k1", 10), ("k2", 10)]) == ["k1", "k2"]  # a lives: not taken over
    assert b.begin("r2", "ctx", "image", [("k2", 10), ("k3", 10)]) == ["k2"]
    assert b.request_status("r2") is None and a.pending_requests(["k3"]) == []  # refused: nothing written
    a.finish("r1", ["k1", "k2"], np.ones((2, 4), np.float32))
    assert b.begin("r3", "ctx", "image", [("k1", 10), ("k3", 10)]) == ["k1"]  # answered meanwhile
    assert b.begin("r4", "ctx", "image", [("k3", 10)]) == []
    assert a.begin("r5", "ctx", "image", [("k5", 10)]) == []
    assert b.begin("r6", "ctx", "image", [("k5", 10)], waited_out=["k5"]) == []  # waited for in vain: sent from here

    inner = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    views = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(inner) as url:
        first, second, in_flight = _two_processes(tmp_path, tiny_teacher_cfg, url)
        probes = charged(inner)[0]
        checks = []
        held = second.ledger.held_elsewhere
        second.ledger.held_elsewhere = lambda keys: held(keys) if checks.append(1) or len(checks) > 1 else []
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("first", first.encode_pixels(views)))
        worker.start()
        assert in_flight.wait(10)
        got = second.encode_pixels(views)  # its first check missed the first one's pending request
        worker.join(10)
        torch.testing.assert_close(got, out["first"])
        assert len(checks) > 1 and charged(inner) == (probes + 4, 0) and second.transport.stats.queries == 0


def test_a_long_retry_after_stops_cleanly(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(inner, script=["429-long"])) as url:
        t = build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url).teacher)
        t0 = time.monotonic()
        with pytest.raises(BudgetError, match="asks to wait 3600 s .* longer than teacher.max_retry_wait=120 s"):
            t.encode_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        assert time.monotonic() - t0 < 5


def test_a_wait_past_max_retry_wait_exits_75_not_as_a_spent_budget(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """A rate limit asking for a wait longer than teacher.max_retry_wait exited 3, the code of a spent budget or
    quota, where its message said to rerun later: 75, try again later (a trial). The cost of finishing is still said."""
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(Faults(app, script=[None, "429-long"])) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url)
        res = extract_cli(config_file(tmp_path, cfg))
    assert res.exit_code == 75, res.output
    line = res.output.strip().splitlines()[-1]
    assert "asks to wait 3600 s" in line and "rerun the same command later" in line and "finishing the store" in line, line


def test_a_spent_credit_stops_at_once(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """OpenAI answers 429 insufficient_quota when the account's credit is spent: retrying it 8 times
    then exiting 75 (try again later) misreads it."""
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    faults = Faults(inner, script=["429-credit"])
    with LiveServer(faults) as url:
        t = build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url).teacher)
        with pytest.raises(BudgetError, match="quota is spent"):
            t.encode_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert t.transport.stats.retries == 0


def test_a_refused_request_is_not_replayed_as_possibly_paid(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """A request the service refused (out of credit) was left pending: the next run replayed it to a
    service without idempotency keys and warned its inputs may be paid twice, though nothing was
    charged. Refused at every attempt, it is closed as failed; one whose answer was lost stays pending."""
    import warnings

    inner = service_app("openai", tiny_teacher_cfg, tiny_teacher, tmp_path)
    views = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(Faults(inner, script=["429-credit"])) as url:
        cfg = remote(tmp_path, "x.zarr", tiny_teacher_cfg, "openai", url, "teacher.dimensions=32").teacher
        refused = build_teacher(cfg)
        with pytest.raises(BudgetError, match="quota is spent"):
            refused.encode_pixels(views)
        refused.transport.close()
        again = build_teacher(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "may be paid twice"
            again.encode_pixels(views)
        again.transport.close()
    assert again.transport.stats.possibly_paid_twice == 0 and again.transport.stats.replayed_requests == 0
    assert charged(inner)[0] == 4
    # killed after the request was written pending and before it went out: replayed free of warnings too
    more = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with LiveServer(inner) as url:
        cfg = replace(cfg, url=url)
        killed = build_teacher(cfg)
        killed.ledger.close_if_uncharged = lambda rid: False  # a kill -9 runs nothing after the begin
        killed.transport.post = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            killed.encode_pixels(more)
        killed.transport.close()
        assert killed.ledger.db.execute("SELECT COUNT(*) FROM requests WHERE status='pending'").fetchone() == (1,)
        again = build_teacher(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again.encode_pixels(more)
        again.transport.close()
    assert again.transport.stats.possibly_paid_twice == 0 and again.transport.stats.replayed_requests == 0


def test_user_mistakes_are_one_line(tmp_path, tiny_teacher_cfg, tiny_teacher, monkeypatch):
    monkeypatch.delenv("EMBEDCACHE_API_KEY", raising=False)
    base = {"name": "remote", "url": "http://127.0.0.1:9", "ledger": str(tmp_path / "l.sqlite")}
    with pytest.raises(ConfigError, match="choose one of cohere-v2, embedcache, openai"):
        build_config(TeacherConfig, {**base, "protocol": "grpc"}, "teacher.")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(TeacherLoadError, match=r"\$NO_SUCH_KEY_VAR \(teacher.api_key_env\) is not set"):
        build_teacher(TeacherConfig(**base, api_key_env="NO_SUCH_KEY_VAR"))
    for misplaced in ("sk-live-abc123", "sekret-KEY-12345", "AKIAIOSFODNN7EXAMPLE"):  # the key where its variable's name goes
        with pytest.raises(TeacherLoadError, match=r"teacher.api_key_env is not a variable name \(not shown: it may "
                                                   r"be the key itself\)") as err:
            build_teacher(TeacherConfig(**base, api_key_env=misplaced))
        assert misplaced not in str(err.value)
        with pytest.raises(TeacherLoadError, match=r"teacher.api_key_file names no file \(not shown: with no / in it, it "
                                                   r"may be the key itself\)") as err:  # it was printed (a trial)
            build_teacher(TeacherConfig(**base, api_key_file=misplaced))
        assert misplaced not in str(err.value)
    with pytest.raises(TeacherLoadError, match=r"teacher.api_key_file /no/such/key.txt not found"):  # a path is said
        build_teacher(TeacherConfig(**base, api_key_file="/no/such/key.txt"))
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(RemoteUnavailableError, match=r"cannot reach the embedding server at http://127.0.0.1:9 .*check teacher.url and that the server is running, then rerun the command$"):  # (a dry run was told "to resume")
        build_teacher(TeacherConfig(**base, api_key_env=KEY_ENV))
    with pytest.raises(ConfigError, match="must not carry credentials"):
        build_teacher(TeacherConfig(**{**base, "url": "http://user:pw@127.0.0.1:9"}))
    with pytest.raises(ConfigError, match="must not carry a query or fragment") as err:  # a key there was printed
        build_teacher(TeacherConfig(**{**base, "url": f"http://127.0.0.1:9/v1?api_key={KEY}"}))
    assert KEY not in str(err.value)
    for bad in (f"{KEY}\nsecond-line", f"{KEY} trailing words", "sk-caf\u00e9"):  # a file of two lines; non-ASCII
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(TeacherLoadError, match=r"the API key in file .*bad.txt is not one printable ASCII token") as err:
            build_teacher(TeacherConfig(**base, api_key_file=str(tmp_path / "bad.txt")))
        assert KEY not in str(err.value)
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url:
        monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
        with pytest.raises(RemoteError) as err:
            build_teacher(TeacherConfig(**{**base, "url": url}, api_key_env=KEY_ENV))
        assert f"refused the API key from ${KEY_ENV} (403)" in str(err.value) and "sk-wrong-key" not in str(err.value)
        with pytest.raises(RemoteError, match=r"wants an API key \(401\) and none was given"):
            build_teacher(TeacherConfig(**{**base, "url": url}))
        (tmp_path / "key.txt").write_text(KEY + "\n")
        os.chmod(tmp_path / "key.txt", 0o600)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a key file only its owner reads: no warning
            t = build_teacher(TeacherConfig(**{**base, "url": url}, api_key_file=str(tmp_path / "key.txt")))
        assert t.embed_dim == tiny_teacher.embed_dim and t.input_size == tiny_teacher.input_size
        os.chmod(tmp_path / "key.txt", 0o644)  # others may read it: said, as ssh says it (it was not, a trial)
        with pytest.warns(UserWarning, match=r"key.txt can be read by other users \(mode 644\); chmod 600 "):
            build_teacher(TeacherConfig(**{**base, "url": url}, api_key_file=str(tmp_path / "key.txt")))


def test_cache_key_has_what_changes_embeddings_and_not_the_url(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    app = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(app) as url1, LiveServer(app) as url2:
        def ident(url, *ov):
            return build_teacher(remote(tmp_path, "x.zarr", tiny_teacher_cfg, "embedcache", url, *ov).teacher)
        png, moved = ident(url1), ident(url2)
        assert png.identity() == moved.identity() and png.describe()["url"] != moved.describe()["url"]
        jpeg = ident(url1, "teacher.image_format=jpeg")
        jpeg80 = ident(url1, "teacher.image_format=jpeg", "teacher.jpeg_quality=80")
        assert len({str(t.identity()) for t in (png, jpeg, jpeg80)}) == 3
        assert png.identity()["server"] == app.state.service.fingerprint
        bigger = ident(url1, "teacher.input_size=48")
        assert bigger.preprocessing() != png.preprocessing()
        smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=32, mode="bilinear")
        x = (smooth * 255).round().to(torch.uint8)
        near = jpeg.encode_pixels(x)  # lossy, but the same image
        assert torch.nn.functional.cosine_similarity(near, png.encode_pixels(x)).min() > 0.9


def test_a_refused_path_is_named_with_a_hint(tmp_path, tiny_teacher_cfg, tiny_teacher, key_env):
    """A service that has no such path (an OpenAI-style base URL given without its /v1) answered "refused
    the request (404): Not Found", naming neither the path posted to nor the likely fix (a trial)."""

    with LiveServer(openai_app(tiny_teacher, KEY)) as url:
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "openai", url + "/nope", "teacher.dimensions=32").teacher
        with pytest.raises(RemoteError, match=r"refused the request to POST /embeddings \(404\): .* \(is teacher.url the "
                                              r"API's base, e.g. ending in /v1"):
            build_teacher(cfg).encode_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    inner = serve_app(tiny_teacher_cfg, tiny_teacher, tmp_path / "server.sqlite")
    with LiveServer(inner) as url:  # the right path, a model it does not serve: no hint about the path
        cfg = remote(tmp_path, "r.zarr", tiny_teacher_cfg, "embedcache", url, "teacher.model=foo").teacher
        with pytest.raises(RemoteError, match=r"\(404\): model 'foo' is not served here; this server serves \S+$"):
            build_teacher(cfg).encode_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
