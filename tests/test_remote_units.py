"""The remote teacher's parts on their own: retry decisions, pacing, the ledger, the codec, and each
protocol's request and answer shapes (parametrized over the registry)."""
from __future__ import annotations

import base64
import email.utils
import threading
import time

import numpy as np
import pytest
import torch

from embedcache import interrupt
from embedcache.teachers.remote import PROTOCOLS, Ledger, RemoteError
from embedcache.teachers.remote.codec import (data_uri, decode_image, encode_views, floats_b64, floats_from_b64,
                                              parse_data_uri)
from embedcache.teachers.remote.ratelimit import Bucket, RateLimiter
from embedcache.teachers.remote.retry import RetryPolicy, TooLongWait, retry_after, should_retry_status, sleep


@pytest.mark.parametrize("echo", [
    "500 oops {key}",                                        # the key as sent
    "500 oops {lower}",                                      # case changed (a review: printed as is)
    "Incorrect API key provided: {head}****{tail}",          # a vendor's masked echo
    "invalid token Bearer{key}x",                            # run into other characters
    "Incorrect API key provided: {head6}****{tail}",         # masked with fewer than 8 of its first characters
    "bad key {quoted}",                                      # URL-encoded
    ("x" * 150) + " {key} and again {key}",                  # a second echo at the length limit (a piece showed)
])
def test_a_key_echoed_in_an_error_body_is_masked_in_any_case_or_part(echo):
    """Only a byte-exact echo of the key was masked: a server's error body holding it lower-cased, or a vendor's
    'SECRETKE****3abc', reached the terminal and the log (a review)."""
    from embedcache.teachers.remote.client import one_line

    from urllib.parse import quote

    key = "SECRETKEY123abc/XYZ7+q"
    text = echo.format(key=key, lower=key.lower(), head=key[:8], head6=key[:6], tail=key[-4:], quoted=quote(key, safe=""))
    said = one_line(text, key)
    pieces = {key[i:i + 4].lower() for i in range(len(key) - 3)}  # no 4 characters of it in a row
    assert "***" in said and not any(p in said.lower() for p in pieces), said
    assert said.split()[0] == text.split()[0]  # the rest of the message is kept
    assert one_line("500 the service is overloaded, retry later", key) == "500 the service is overloaded, retry later"


def test_key_masking_keeps_what_is_not_the_key():
    """A URL holding the key was masked whole (which endpoint failed went with it), and any word with stars in it was
    masked; a message cut at SCANNED raw characters left a piece of a key its cut made (a review)."""
    from embedcache.teachers.remote.client import SCANNED, one_line

    key = "SECRETKEY123abc/XYZ7+q"
    assert one_line(f"POST https://api.x.com/v1/embed?key={key} returned 401", key) == \
        "POST https://api.x.com/v1/embed?key=*** returned 401"
    assert one_line("see docs ****important**** now", key) == "see docs ****important**** now"
    cut = one_line(" " * (SCANNED - 10) + key + " tail", key)
    assert not any(key[i:i + 4].lower() in cut.lower() for i in range(len(key) - 3)), cut


def test_a_short_key_is_masked_only_whole():
    """A short key (a local test one) masked every word holding it: 'latest models: test-1' became '*** models: ***'
    (a review)."""
    from embedcache.teachers.remote.client import one_line

    assert one_line("latest models: test-1, contest; key TEST refused", "test") == "latest models: test-1, contest; key *** refused"


def test_retry_after_reads_ms_then_seconds_then_an_http_date():
    now = time.time()
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"Retry-After": "3"}) == 3.0
    assert retry_after({"retry-after": "1.5"}) == 1.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after({"retry-after": date}, now=now) <= 31
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None and retry_after(None) is None


@pytest.mark.parametrize("status,retry", [(408, True), (409, True), (429, True), (500, True), (502, True), (503, True),
                                          (400, False), (401, False), (403, False), (404, False), (413, False), (422, False)])
def test_which_statuses_are_retried(status, retry):
    assert should_retry_status(status) is retry


def test_the_server_can_say_retry_or_not():
    assert should_retry_status(400, {"x-should-retry": "true"}) and not should_retry_status(503, {"x-should-retry": "false"})


def test_waits_honour_the_server_then_back_off_with_jitter():
    p = RetryPolicy(max_retries=8, initial=0.5, max_wait=120)
    assert p.wait(0, {"retry-after-ms": "40"}) == 0.04
    assert p.wait(3, {"retry-after": "7"}) == 7.0
    for retry, top in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        waits = [p.wait(retry) for _ in range(50)]
        assert all(0.75 * top <= w <= top for w in waits) and len(set(waits)) > 1  # up to 25% jitter off
    with pytest.raises(TooLongWait) as err:
        p.wait(0, {"retry-after": "3600"})
    assert err.value.seconds == 3600
    assert p.wait(0, {"retry-after": "-5"}) <= 0.5  # a date in the past: back off instead


def test_a_retry_sleep_wakes_up_for_ctrl_c():
    interrupt.reset()
    threading.Timer(0.1, interrupt.request).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt, match="rerun the same command"):
            sleep(30)
    finally:
        interrupt.reset()
    assert time.monotonic() - t0 < 2


def test_rate_limiter_paces_requests_and_tokens():
    now = [0.0]
    slept = []

    def fake_sleep(s):
        slept.append(s)
        now[0] += s

    lim = RateLimiter(requests_per_minute=60, tokens_per_minute=600, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(60):  # a minute's burst goes at once
        lim.acquire(tokens=1)
    assert not slept
    lim.acquire(tokens=1)  # then one a second
    assert slept and abs(sum(slept) - 1.0) < 1e-6
    lim.acquire(tokens=600)  # 61 of 600 tokens spent, 10 back after a second: 51 to wait for at 10 a second
    assert lim.waited == pytest.approx(1.0 + 5.1)
    b = Bucket(6, clock=lambda: now[0])
    assert b.take(6) == 0 and b.take(1) == pytest.approx(10.0)


def test_codec_png_round_trip_is_exact_and_refuses_garbage():
    x = torch.randint(0, 256, (3, 3, 17, 23), dtype=torch.uint8)
    blobs = encode_views(x)
    assert blobs == encode_views(x.clone())  # deterministic bytes
    for b, v in zip(blobs, x):
        assert np.array_equal(decode_image(b), v.permute(1, 2, 0).numpy())
    jpeg = decode_image(encode_views(x, "jpeg", 95)[0])
    assert jpeg.shape == (17, 23, 3)
    mime, raw = parse_data_uri(data_uri(blobs[0], "png"))
    assert mime == "image/png" and raw == blobs[0]
    for bad in ["http://example.com/cat.png", "data:image/png,abc", "data:image/png;base64,@@@"]:
        with pytest.raises(ValueError):
            parse_data_uri(bad)
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(b"GIF89a garbage")
    with pytest.raises(ValueError, match="larger than"):
        decode_image(encode_views(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))[0], max_pixels=100)
    v = np.random.default_rng(0).standard_normal(7).astype(np.float32)
    assert np.array_equal(floats_from_b64(floats_b64(v)), v)


def test_ledger_pending_then_done_and_its_books(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.add_context("ctx", {"protocol": "x"})
    led.begin("r1", "ctx", "image", [("a", 10), ("b", 20)])
    assert led.lookup(["a", "b"]) == {} and led.pending_requests(["b"]) == [("r1", ["a", "b"])]
    row = led.sent("r1", 0)
    led.outcome(row, "r1", "lost:ReadTimeout", lost=True)
    assert led.totals("ctx") == {"entries": 0, "requests": 1, "paid_inputs": 0, "replayed_elsewhere_inputs": 0,
                                 "possibly_paid_inputs": 2}
    assert led.totals("ctx", replays_free=True)["possibly_paid_inputs"] == 2  # unsettled either way
    led.finish("r1", ["a", "b"], np.array([[1, 0], [0, 1]], np.float32), {"prompt_tokens": 2})
    # answered under its idempotency key, the lost send was charged once at most: in paid_inputs (a trial saw
    # a settled replay counted as possibly paid in every later store's books); without the key it may be twice
    assert led.totals("ctx", replays_free=True)["possibly_paid_inputs"] == 0
    assert led.totals("ctx")["possibly_paid_inputs"] == 2
    got = led.lookup(["b", "a", "zz"])
    assert set(got) == {"a", "b"} and np.array_equal(got["b"], [0, 1]) and led.any_dim("ctx") == 2
    assert led.pending_requests(["a"]) == [] and led.request_status("r1") == "done"
    assert led.begin("r2", "ctx", "image", [("a", 10), ("c", 5)]) == ["a"]  # answered since: not sent again
    assert led.lookup(["a"]) and led.pending_requests(["c"]) == [] and led.request_status("r2") is None
    assert led.begin("r2", "ctx", "image", [("c", 5)]) == [] and led.pending_requests(["c"]) == [("r2", ["c"])]
    led.close_request("r2", "failed")
    assert led.totals() == {"entries": 2, "requests": 2, "paid_inputs": 2, "replayed_elsewhere_inputs": 0,
                            "possibly_paid_inputs": 2}
    led.close()
    assert Ledger(tmp_path / "l.sqlite").lookup(["a"])  # it is a file: the next run sees it


def _forked_sender(path, said, go_on):
    led = Ledger(path)
    led.begin("r-child", "ctx", "image", [("k-child", 10)])
    said.put(led.owner)
    go_on.wait(30)


def test_a_forked_child_is_an_owner_of_its_own_and_a_process_leaves_no_owner_file(tmp_path):
    """A forked child shared its parent's owner id: the parent took the child's pending requests for
    its own (never waited for, sent again and paid twice). And a process that exits normally removes
    its owner file (a killed one's is removed by the next process that finds it unlocked)."""
    import multiprocessing
    import subprocess
    import sys

    path = tmp_path / "l.sqlite"
    parent = Ledger(path)
    ctx = multiprocessing.get_context("fork")
    said, go_on = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_forked_sender, args=(path, said, go_on))
    child.start()
    try:
        owner = said.get(timeout=30)
        assert owner != parent.owner and parent.held_elsewhere(["k-child"]) == ["k-child"]
    finally:
        go_on.set()
        child.join(30)
    assert child.exitcode == 0 and parent.held_elsewhere(["k-child"]) == []  # its lock went with it
    assert (parent.owners / parent.owner).exists()  # the parent's own stays held
    before = set(parent.owners.iterdir())
    subprocess.run([sys.executable, "-c", f"from embedcache.teachers.remote import Ledger; Ledger({str(path)!r})"],
                   check=True, timeout=120)
    assert set(parent.owners.iterdir()) == before


def _openai_answer(emb, order, b64=True):
    return {"data": [{"index": i, "embedding": floats_b64(emb[i]) if b64 else emb[i].tolist()} for i in order],
            "usage": {"prompt_tokens": len(order), "total_tokens": len(order)}}


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_each_protocol_builds_its_requests(name):
    proto = PROTOCOLS.get(name)({"max_batch": 64, "max_request_bytes": 1000, "embed_dim": 4})
    path, body = proto.image_request("m", [b"\x89PNG..."], "png", None)
    limits = proto.limits("m")
    assert limits["image_batch"] >= 1 and limits["text_batch"] >= 1
    if proto.data_uri:
        images = body.get("input") or body.get("images")
        assert images == ["data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()]
    else:
        assert body["images"] == [base64.b64encode(b"\x89PNG...").decode()] and body["format"] == "png"
    tpath, tbody = proto.text_request("m", ["a cat"], None)
    assert "modality" not in tbody and tpath.startswith("/")
    assert proto.too_large(413, "") and proto.too_large(400, "too many images, at most 1 per call")
    assert proto.too_large(422, "List should have at most 32 items after validation") and not proto.too_large(400, "bad model")


def test_openai_answers_are_matched_by_index_and_checked():
    proto = PROTOCOLS.get("openai")()
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got, usage = proto.parse(_openai_answer(emb, [2, 0, 1]), 3)
    assert np.array_equal(got, emb) and usage == {"prompt_tokens": 3, "total_tokens": 3}
    assert np.allclose(proto.parse(_openai_answer(emb, [1, 2, 0], b64=False), 3)[0], emb)
    out_of_range = _openai_answer(emb, [0, 1, 2])
    out_of_range["data"][2]["index"] = 5
    for bad, msg in [(_openai_answer(emb, [0, 1]), "asked for 3"), (_openai_answer(emb, [0, 1, 1]), "repeated"),
                     (out_of_range, "out of range"), ({"nope": 1}, "no 'data'")]:
        with pytest.raises(RemoteError, match=msg):
            proto.parse(bad, 3)
    ragged = _openai_answer(emb, [0, 1, 2])
    ragged["data"][1]["embedding"] = floats_b64(emb[1][:3])
    with pytest.raises(RemoteError, match="different dimensions"):
        proto.parse(ragged, 3)


def test_cohere_answers_and_limits():
    proto = PROTOCOLS.get("cohere-v2")()
    emb = np.ones((2, 4), np.float32)
    got, usage = proto.parse({"embeddings": {"float": emb.tolist()}, "meta": {"billed_units": {"images": 2}}}, 2)
    assert np.array_equal(got, emb) and usage == {"images": 2}
    with pytest.raises(RemoteError, match="asked for 3"):
        proto.parse({"embeddings": {"float": emb.tolist()}}, 3)
    assert proto.limits("embed-english-v3.0")["image_batch"] == 1 and proto.limits("embed-v4.0")["image_batch"] == 96
    assert proto.image_request("embed-v4.0", [b"x"], "jpeg", 256)[1]["output_dimension"] == 256


def test_embedcache_refuses_an_answer_from_another_teacher():
    proto = PROTOCOLS.get("embedcache")({"fingerprint": "aaa", "embed_dim": 4})
    ans = _openai_answer(np.ones((1, 4), np.float32), [0])
    assert proto.parse({**ans, "fingerprint": "aaa"}, 1)[0].shape == (1, 4)
    with pytest.raises(RemoteError, match="teacher changed"):
        proto.parse({**ans, "fingerprint": "bbb"}, 1)


def test_call_marks_tell_a_cut_off_call_from_a_live_or_closed_one(tmp_path):
    """An empty mark (a machine lost while writing it) crashed the store's finish; a mark of a process
    of the same number as a live one but started at another time (a container's PID 1 again) hid a
    killed call (a review)."""
    import json
    import os

    from conftest import block_store
    from embedcache.store import Store
    from embedcache.store.books import _started

    path, _ = block_store(tmp_path, "zarr")
    with Store(path, "a") as st:
        st.open_call("live")       # this process: alive
        st.open_call("closed")
        st.close_call("closed")
        st.b.put_blob("calls/empty.json", b"")  # cut off while written
        st.b.put_blob("calls/reused.json", json.dumps({"open": True, "pid": os.getpid(), "host": __import__("socket")
                                                       .gethostname(), "start": str(int(_started(os.getpid())) - 1)}).encode())
        assert st.calls_cut_short(running="none") == 2  # empty and reused; never live or closed
        assert st.calls_cut_short(running="reused") == 1


def test_a_later_books_entry_without_a_model_does_not_erase_the_stores():
    """The store's books keep the model its answers named (a resume is held to it): an entry that names
    none, a call whose answers named none yet, left the record as None."""
    from embedcache.store.books import _plus

    total = None
    for entry in ({"answered_model": "clip-a", "queries": 2}, {"answered_model": None, "queries": 3}):
        total = {k: _plus((total or {}).get(k), v, k) for k, v in entry.items()}
    assert total == {"answered_model": "clip-a", "queries": 5}
