"""``embedcache serve`` on loopback: keys, errors, limits, quotas, idempotency, the OpenAI and Cohere
shapes as real clients (openai, cohere) send them, and the command line."""
from __future__ import annotations

import base64
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="embedcache serve needs the serve extra: pip install '.[serve]'")

from embedcache.config import load_config, to_dict
from embedcache.errors import BudgetError, ConfigError
from embedcache.extract import extract
from embedcache.serve import ServeConfig, build_app
from embedcache.serve.keys import KeyInfo, KeyRing, key_digest
from embedcache.store import Store
from embedcache.teachers.remote.codec import data_uri, encode_views, floats_from_b64

from remote_fakes import LiveServer, files_containing

KEY, OTHER = "sk-serve-test-0a1b2c3d4e5f-SECRET", "sk-serve-other-99887766"


def png(x: torch.Tensor) -> list:
    return [base64.b64encode(b).decode() for b in encode_views(x)]


@pytest.fixture
def views():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.fixture
def server(tmp_path, tiny_teacher_cfg, tiny_teacher):
    """start(**settings) -> (url, app): the tiny teacher served with two keys (alice, bob)."""
    servers = []

    def start(keys=None, **settings):
        cfg = ServeConfig(teacher=tiny_teacher_cfg, ledger=str(tmp_path / "server.sqlite"), model_name="tiny", **settings)
        ring = keys or KeyRing({key_digest(KEY): KeyInfo("alice"), key_digest(OTHER): KeyInfo("bob", quota=5)})
        app = build_app(cfg, teacher=tiny_teacher, keys=ring)
        live = LiveServer(app, tmp_path / "server.log")
        servers.append(live)
        return live.__enter__(), app

    yield start
    for live in servers:
        live.__exit__(None, None, None)


def auth(key=KEY, **extra):
    return {"Authorization": f"Bearer {key}", **extra}


def test_keys_errors_and_description(server, tiny_teacher, views, tmp_path):
    url, app = server()
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/v1/describe")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/describe", headers=auth("sk-wrong")).status_code == 403
        d = c.get("/v1/describe", headers=auth()).json()
        assert d["embed_dim"] == tiny_teacher.embed_dim and d["input_size"] == tiny_teacher.input_size
        assert d["model"] == "tiny" and len(d["fingerprint"]) == 24
        text = json.dumps(d)  # neither the weights nor the architecture: no paths, no model names, no hashes of files
        assert "local-dir" not in text and "safetensors" not in text and "open_clip" not in text
        body = {"images": png(views)}
        assert c.post("/v1/embed/images", json=body).status_code == 401
        assert c.post("/v1/embed/images", json=body, headers=auth("sk-wrong")).status_code == 403
        r = c.post("/v1/embed/images", json=body, headers=auth())
        assert r.status_code == 200
        got = np.stack([floats_from_b64(row["embedding"]) for row in r.json()["data"]])
        assert np.array_equal(got, tiny_teacher.encode_pixels(views).numpy())  # the very bits, one batch
        assert r.json()["usage"] == {"queries": 6, "images": 6, "texts": 0, "bytes": sum(len(b) for b in encode_views(views))}
        t = c.post("/v1/embed/texts", json={"texts": ["a photo of a cat."]}, headers=auth()).json()
        assert np.array_equal(floats_from_b64(t["data"][0]["embedding"]),
                              tiny_teacher.encode_text(["a photo of a cat."]).numpy()[0])
        tok = c.post("/v1/count_tokens", json={"texts": ["a b c"]}, headers=auth()).json()
        assert tok["tokens"] == tiny_teacher.count_tokens(["a b c"])
        u = c.get("/v1/usage", headers=auth()).json()
        assert u["key"] == "alice" and u["queries"] == 7 and u["images"] == 6
        # bad input: 4xx, and the server keeps serving
        cases = [({"images": ["not base64!"]}, 400), ({"images": [base64.b64encode(b"not an image").decode()]}, 400),
                 ({"images": png(views), "surprise": 1}, 422), ({"images": []}, 422), ({"texts": "x"}, 422),
                 ({"images": png(views), "model": "gpt-9"}, 404), ({"images": png(views), "dimensions": 7}, 400)]
        for bad, status in cases:
            r = c.post("/v1/embed/images", json=bad, headers=auth())
            assert r.status_code == status, (bad, r.text)
            assert r.json()["error"]["message"]
        r = c.post("/v1/embed/images", content=b"{not json", headers=auth(**{"Content-Type": "application/json"}))
        assert r.status_code == 422
        assert c.post("/v1/embed/images", json=body, headers=auth()).status_code == 200
    assert not files_containing([tmp_path], KEY.encode()) and not files_containing([tmp_path], OTHER.encode())


def test_size_limits_are_413(server, views):
    url, _ = server(max_batch=4, max_request_bytes=40_000, max_image_pixels=40 * 40)
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/v1/embed/images", json={"images": png(views)}, headers=auth())
        assert r.status_code == 413 and "at most 4" in r.json()["error"]["message"]
        big = {"texts": ["x" * 50_000]}
        r = c.post("/v1/embed/texts", json=big, headers=auth())
        assert r.status_code == 413 and "larger than 40000 bytes" in r.json()["error"]["message"]
        huge = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)  # 4096 pixels > 1600 allowed
        r = c.post("/v1/embed/images", json={"images": png(huge)}, headers=auth())
        assert r.status_code == 413
        assert c.post("/v1/embed/images", json={"images": png(views[:4])}, headers=auth()).status_code == 200
        # a sliver of few pixels would be resized to width x 32 (the teacher's input) on its shorter side:
        # 600 x 1 -> 19,200 x 32 pixels; refused before the resize (8000 x 1, 102 bytes, took 2 GB)
        sliver = torch.zeros(1, 3, 1, 600, dtype=torch.uint8)
        r = c.post("/v1/embed/images", json={"images": png(sliver)}, headers=auth())
        assert r.status_code == 413 and "crop it closer to square" in r.json()["error"]["message"]


def test_a_sliver_past_the_resize_limit_is_413_under_any_pixel_setting(server):
    """max_image_pixels set above the canvas resize limit (32 M pixels): 1 x 40,000 -> 1,280,000 x 32
    is refused as too large, not a 500 from the resize's own check."""
    url, _ = server(max_image_pixels=10**9)
    with httpx.Client(base_url=url, timeout=10) as c:
        sliver = torch.zeros(1, 3, 1, 40_000, dtype=torch.uint8)
        r = c.post("/v1/embed/images", json={"images": png(sliver)}, headers=auth())
        assert r.status_code == 413 and "crop it closer to square" in r.json()["error"]["message"], r.text


def test_rate_limit_and_quota_are_429_with_retry_after(server, views):
    url, app = server(requests_per_minute=2, quota_period_s=3600)
    with httpx.Client(base_url=url, timeout=10) as c:
        body = {"images": png(views[:1])}
        assert c.post("/v1/embed/images", json=body, headers=auth()).status_code == 200
        assert c.post("/v1/embed/images", json=body, headers=auth()).status_code == 200
        r = c.post("/v1/embed/images", json=body, headers=auth())
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 30 and int(r.headers["retry-after-ms"]) > 0
        # bob's quota is 5 queries (and the rate limit is per key)
        assert c.post("/v1/embed/images", json={"images": png(views[:4])}, headers=auth(OTHER)).status_code == 200
        r = c.post("/v1/embed/images", json={"images": png(views[4:6])}, headers=auth(OTHER))
        assert r.status_code == 429 and r.json()["error"]["type"] == "quota_exceeded"
        assert int(r.headers["retry-after"]) > 0 and "4 of 5 queries used" in r.json()["error"]["message"]
        # when it renews, as a time: it said "in 40290 s" for a daily quota, which reads as 24 h after first use
        assert re.search(r"it renews at \d{4}-\d\d-\d\d \d\d:00:00 UTC, in \d+ s \(quota periods count from "
                         r"1970-01-01 00:00 UTC", r.json()["error"]["message"]), r.json()["error"]["message"]
    assert app.state.service.ledger.summary("bob")[0]["queries"] == 4


def test_idempotent_retries_are_answered_free(server, views):
    url, app = server()
    body = {"images": png(views)}
    with httpx.Client(base_url=url, timeout=10) as c:
        first = c.post("/v1/embed/images", json=body, headers=auth(**{"Idempotency-Key": "req-1"}))
        again = c.post("/v1/embed/images", json=body, headers=auth(**{"Idempotency-Key": "req-1"}))
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        other = c.post("/v1/embed/images", json={"images": png(views[:2])}, headers=auth(**{"Idempotency-Key": "req-1"}))
        assert other.status_code == 422 and other.json()["error"]["type"] == "idempotency_conflict"
        # the key scopes idempotency: bob's req-1 is his own request (and his quota of 5 refuses 6)
        assert c.post("/v1/embed/images", json=body, headers=auth(OTHER, **{"Idempotency-Key": "req-1"})).status_code == 429
    led = app.state.service.ledger
    assert led.summary("alice")[0]["queries"] == 6 and led.summary("alice")[0]["free_replays"] == 1
    assert led.double_charges() == 0


def test_over_quota_extraction_stops_cleanly_and_resumes(server, make_cfg, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    ring = KeyRing({key_digest(KEY): KeyInfo("alice", quota=30)})
    url, app = server(keys=ring)
    remote = ["teacher.name=remote", "teacher.model=", f"teacher.url={url}", "teacher.api_key_env=SERVE_TEST_KEY",
              f"teacher.ledger={tmp_path / 'client.sqlite'}"]
    cfg = make_cfg("q.zarr", *remote)
    with pytest.raises(BudgetError) as err:
        extract(cfg, log=lambda m: None)
    msg = str(err.value)
    assert "quota is spent" in msg and "24 of 30 queries used" in msg and "finishing the store needs 90 more" in msg
    assert KEY not in msg and "\n" not in msg
    with Store(cfg.out) as st:
        assert st.blocks_done().tolist() == [True, False, False, False]
    # the provider raises the quota: the same command finishes the same store, nothing paid twice
    url2, app2 = server(keys=KeyRing({key_digest(KEY): KeyInfo("alice", quota=1000)}))
    cfg2 = make_cfg("q.zarr", *remote[:2], f"teacher.url={url2}", *remote[3:])
    assert extract(cfg2, log=lambda m: None).complete
    local = make_cfg("local.zarr")
    extract(local, teacher=tiny_teacher, log=lambda m: None)
    with Store(local.out) as a, Store(cfg.out) as b:
        assert np.array_equal(a.b.read("image/emb"), b.b.read("image/emb"))
    assert app2.state.service.ledger.summary("alice")[0]["queries"] == 90 + 24
    assert app2.state.service.ledger.double_charges() == 0


def test_real_openai_client(server, tiny_teacher, views):
    openai = pytest.importorskip("openai")
    url, app = server()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    res = client.embeddings.create(model="tiny", input=[data_uri(b, "png") for b in encode_views(views)],
                                   extra_body={"modality": "image"})
    got = np.array([d.embedding for d in sorted(res.data, key=lambda d: d.index)], dtype=np.float32)
    assert np.array_equal(got, tiny_teacher.encode_pixels(views).numpy())  # base64 by default: exact
    assert res.usage.prompt_tokens == 6
    txt = client.embeddings.create(model="tiny", input=["a photo of a dog."], encoding_format="float")
    np.testing.assert_allclose(txt.data[0].embedding, tiny_teacher.encode_text(["a photo of a dog."]).numpy()[0],
                               rtol=0, atol=1e-7)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # images without modality "image" were embedded as the text of their data URIs, every image alike (a trial)
    billed = app.state.service.ledger.summary()
    with pytest.raises(openai.BadRequestError, match=r"input 0 is an image \(a data:image/ URI\) sent as text; send "
                                                     r"images with \"modality\": \"image\""):
        client.embeddings.create(model="tiny", input=[data_uri(b, "png") for b in encode_views(views)])
    assert app.state.service.ledger.summary() == billed  # nothing charged
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).embeddings.create(model="tiny", input=["x"])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="not-here", input=["x"])


def test_real_cohere_client(server, tiny_teacher, views):
    cohere = pytest.importorskip("cohere")
    url, _ = server()
    client = cohere.ClientV2(api_key=KEY, base_url=url)
    res = client.embed(model="tiny", input_type="image", images=[data_uri(b, "png") for b in encode_views(views)],
                       embedding_types=["float"])
    got = np.array(res.embeddings.float_, dtype=np.float32)
    assert np.array_equal(got, tiny_teacher.encode_pixels(views).numpy())
    assert res.meta.billed_units.images == 6 and len(res.images) == 6
    txt = client.embed(model="tiny", input_type="search_query", texts=["a cat"], embedding_types=["float"])
    assert np.array_equal(np.array(txt.embeddings.float_, np.float32), tiny_teacher.encode_text(["a cat"]).numpy())
    with pytest.raises(Exception) as err:
        cohere.ClientV2(api_key="wrong", base_url=url).embed(model="tiny", input_type="search_query", texts=["x"],
                                                             embedding_types=["float"])
    assert getattr(err.value, "status_code", None) == 403


def test_keys_are_kept_hashed(tmp_path, monkeypatch):
    f = tmp_path / "keys.yaml"
    f.write_text(f"alice: {{sha256: {key_digest(KEY)}, quota: 100}}\nbob: {{key: {OTHER}}}\n")
    monkeypatch.setenv("SERVE_KEYS", "carol:sk-carol-1,sk-bare-2")
    ring = KeyRing.load(str(f), "SERVE_KEYS")
    assert ring.names() == ["alice", "bob", "carol", "key1"]
    assert ring.match(KEY).quota == 100 and ring.match(OTHER).name == "bob" and ring.match("sk-bare-2").name == "key1"
    assert ring.match("nope") is None and KEY not in repr(vars(ring))
    monkeypatch.delenv("SERVE_KEYS")
    with pytest.raises(ConfigError, match="no API keys"):
        KeyRing.load(None, "SERVE_KEYS")
    f.write_text("alice: {sha256: abc}\n")
    with pytest.raises(ConfigError, match="not 64 hex"):
        KeyRing.load(str(f), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hash_key_given_the_key_as_an_argument_refuses_without_echoing_it():
    """`serve hash-key SECRET` said click's "Got unexpected extra argument (SECRET)": the key on the terminal and in
    any log of it (a review)."""
    from click.testing import CliRunner

    from embedcache.cli import main

    for key in (KEY, "--" + KEY):  # one like an option: click's "No such option '--...'" echoed it too
        res = CliRunner().invoke(main, ["serve", "hash-key", "--name", "bob", key], input="")
        assert res.exit_code == 2 and KEY not in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert "takes the key on standard input, not as an argument (1 given, not shown" in res.output


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serve_starts_with_one_command_and_a_config(tmp_path, tiny_teacher_cfg, stop):
    from click.testing import CliRunner

    from embedcache.cli import main

    res = CliRunner().invoke(main, ["serve", "hash-key", "--name", "alice"], input=KEY + "\n")
    assert res.exit_code == 0 and res.output.strip() == f"alice: {{sha256: {key_digest(KEY)}}}"
    (tmp_path / "keys.yaml").write_text(res.output)  # the keys file line, as printed
    port = _free_port()
    conf = tmp_path / "serve.yaml"
    conf.write_text(json.dumps({"teacher": to_dict(tiny_teacher_cfg), "port": port, "keys_file": str(tmp_path / "keys.yaml"),
                                "keys_env": None, "ledger": str(tmp_path / "ledger.sqlite"), "model_name": "tiny"}))
    assert load_config(ServeConfig, str(conf), kind="serve").port == port
    assert load_config(ServeConfig, "demo", kind="serve").teacher.name == "conse"  # the packaged one builds too
    for bad in ("embed", "/embed/"):  # served under a prefix the proxy never sends (a fuzzing trial)
        with pytest.raises(ConfigError, match=f"root_path='{bad}' is not a path prefix: .*\\(e.g. /embed\\)"):
            load_config(ServeConfig, str(conf), [f"root_path={bad}"], kind="serve")
    assert load_config(ServeConfig, str(conf), ["root_path=/embed"], kind="serve").root_path == "/embed"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "embedcache.cli", "serve", "--config", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "embedcache serve did not start in 60 s"
            time.sleep(0.2)
        d = httpx.get(f"http://127.0.0.1:{port}/v1/describe", headers=auth(), timeout=5).json()
        assert d["model"] == "tiny" and d["embed_dim"] == 32
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed/texts", json={"texts": ["a"]}, headers=auth(), timeout=10)
        assert r.status_code == 200
        proc.send_signal(stop)  # Ctrl-C or SIGTERM (systemd, docker): the server's normal stop, exit 0, no traceback
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    text = log.read_text()
    assert "serving open_clip teacher as 'tiny'" in text and "Traceback" not in text, text
    assert "note:" not in text  # on loopback: nothing beyond this machine reaches it
    assert text.rstrip().endswith(f"stopped; every charge is in the ledger {tmp_path / 'ledger.sqlite'} "
                                    "(`embedcache serve ledger` prints them)"), text
    res = CliRunner().invoke(main, ["serve", "ledger", "--config", str(conf)])
    assert res.exit_code == 0 and "key alice  requests 1  queries 1" in res.output
    res = CliRunner().invoke(main, ["serve", "ledger", "--config", str(conf), "--set", f"ledger={tmp_path / 'no.sqlite'}"])
    assert res.exit_code == 2 and f"no ledger at {tmp_path / 'no.sqlite'}; run this where the server runs" in res.output, \
        res.output  # it made an empty one there and said "no charges yet" (a trial)
    assert not (tmp_path / "no.sqlite").exists()
    assert not files_containing([tmp_path], KEY.encode())


def test_serve_on_a_port_in_use_is_one_line_before_the_teacher_loads(tmp_path, tiny_teacher_cfg, monkeypatch):
    """A second `serve` on a busy port said "serving ... on" that port, loaded the teacher, then exited 3
    (the budget's code) on uvicorn's bind error (a trial)."""
    import socket

    from click.testing import CliRunner

    import embedcache.serve as serving
    from embedcache.cli import main

    monkeypatch.setattr(serving, "build_app", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = tmp_path / "serve.yaml"
        conf.write_text(json.dumps({"teacher": to_dict(tiny_teacher_cfg), "port": port, "keys_env": None,
                                    "ledger": str(tmp_path / "ledger.sqlite"), "model_name": "tiny"}))
        res = CliRunner().invoke(main, ["serve", "--config", str(conf)])
    assert res.exit_code == 2, res.output
    assert f"port {port} on 127.0.0.1 is in use (another `embedcache serve`?); give another --port" in res.output
    assert "serving" not in res.output and "Traceback" not in res.output
    # a host this machine has no address of, with any free port (port 0 went unchecked: uvicorn's error, exit 3,
    # a trial); TEST-NET-1, so no name is looked up
    conf.write_text(json.dumps({"teacher": to_dict(tiny_teacher_cfg), "port": 0, "host": "192.0.2.1",
                                "keys_env": None, "ledger": str(tmp_path / "ledger.sqlite"), "model_name": "tiny"}))
    res = CliRunner().invoke(main, ["serve", "--config", str(conf)])
    assert res.exit_code == 2 and "cannot listen on 192.0.2.1:0 (" in res.output, res.output
    assert "give another --host or --port" in res.output and "serving" not in res.output


def test_a_server_other_machines_can_reach_says_its_keys_travel_in_clear():
    """host=0.0.0.0 (or '', which uvicorn binds as every interface, said as "http://:8000") served API keys over
    plain HTTP to the network without a word: the config's comment alone said to put it behind a TLS proxy."""
    from embedcache.serve import reached_from

    assert reached_from("127.0.0.1") == reached_from("localhost") == reached_from("::1") == ""
    assert reached_from("") == reached_from("0.0.0.0") == "every network this machine is on"
    assert reached_from("10.1.2.3") == "the network of 10.1.2.3"


def test_serve_says_when_other_machines_can_reach_it(tmp_path, tiny_teacher_cfg, tiny_teacher, monkeypatch):
    """The note, through ``serve`` itself (nothing listens: the port check and uvicorn are stood in for)."""
    import uvicorn

    import embedcache.serve as serving

    monkeypatch.setattr(serving, "_require_free_port", lambda host, port: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    said = []
    for host in ("0.0.0.0", "127.0.0.1"):
        cfg = ServeConfig(teacher=tiny_teacher_cfg, host=host, port=8000, keys_env="SERVE_TEST_KEY",
                          ledger=str(tmp_path / f"{host}.sqlite"))
        serving.serve(cfg, log=said.append, teacher=tiny_teacher)
    notes = [line for line in said if line.startswith("note:")]
    assert notes == ["note: every network this machine is on can reach it over plain HTTP, the API keys of its "
                     "requests in clear: serve it behind a TLS-terminating reverse proxy (root_path, "
                     "forwarded_allow_ips), or keep host=127.0.0.1"], said
