"""Processes sharing one ledger, each step of a request at a time: who owns a pending request, what is
claimed against the store's budget, and what is counted as replayed or possibly paid twice, when
another process acts between two steps. A remote teacher on a mocked OpenAI-style service (no server)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import httpx
import numpy as np
import pytest

from embedcache.config import TeacherConfig
from embedcache.errors import BudgetError
from embedcache.teachers.remote.client import Transport
from embedcache.teachers.remote.ledger import Ledger
from embedcache.teachers.remote.protocols import PROTOCOLS
from embedcache.teachers.remote.ratelimit import RateLimiter
from embedcache.teachers.remote.retry import RetryPolicy
from embedcache.teachers.remote import teacher as teacher_mod
from embedcache.teachers.remote.teacher import RemoteTeacher

DIM = 4


def _answer(request: httpx.Request) -> httpx.Response:
    n = len(json.loads(request.content)["input"])
    data = [{"index": i, "embedding": np.eye(DIM, dtype=np.float32)[i % DIM].tolist()} for i in range(n)]
    return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": n, "total_tokens": n}})


def _teacher(ledger: Ledger, max_queries=None) -> RemoteTeacher:
    """A remote teacher (openai protocol) on a mocked service: no server, no dimension probe."""
    t = RemoteTeacher.__new__(RemoteTeacher)
    t.cfg = TeacherConfig(name="remote", url="http://svc", protocol="openai", max_retries=0, retry_backoff=0.0,
                          timeout=1.0, max_queries=max_queries)
    t.protocol_name, t.url, t.model = "openai", "http://svc", "m"
    t.protocol = PROTOCOLS.get("openai")()
    t.ledger = ledger
    t.transport = Transport("http://svc", t.protocol, "sk-x", "test", ledger, RetryPolicy(0, 0.0, 1.0),
                            RateLimiter(None, None), 1.0, max_queries)
    t.transport.http = httpx.Client(transport=httpx.MockTransport(_answer))
    t.input_size, t.embed_dim, t.fingerprint = 32, DIM, None
    t.limits = {"image_batch": 8, "text_batch": 8, "max_image_bytes": None, "max_request_bytes": None}
    t._ctx, t._texts_paid = {"image": "ctx-image", "text": "ctx-text"}, set()
    t.begin_plan()
    return t


def _answered_between_wait_and_begin(t: RemoteTeacher, other: Ledger, key: str) -> None:
    """Another process answers ``key`` right after ``t``'s first wait-check (before its begin)."""
    wait = t._wait_for_others

    def then_answered(*args, **kw):
        out = wait(*args, **kw)
        if not other.lookup([key]):
            assert other.begin("r-other", "ctx-text", "text", [(key, 1)]) == []
            other.finish("r-other", [key], np.ones((1, DIM), np.float32))
        return out

    t._wait_for_others = then_answered


def test_only_a_requests_owner_closes_or_disowns_it(tmp_path):
    """Request ids follow the inputs, so two processes sending the same batch share one: B waited A out
    and took it over; A, giving up, closed or disowned it while B was sending, and a third process no
    longer saw the inputs in flight and sent them too."""
    a, b, c = (Ledger(tmp_path / "l.sqlite", owner=f"proc-{x}") for x in "abc")
    assert a.begin("R", "ctx", "text", [("k", 3)]) == []
    assert b.begin("R", "ctx", "text", [("k", 3)], waited_out=["k"]) == []  # taken over: B's now
    a.outcome(a.sent("R", 0), "R", "http:400")  # A's own attempt refused
    assert not a.close_if_uncharged("R")
    a.disown("R")
    a.close_request("R", "failed")
    assert c.held_elsewhere(["k"]) == ["k"] and c.request_status("R") == "pending"
    assert b.close_if_uncharged("R") and b.request_status("R") == "failed"  # its owner may


def test_a_refused_begin_claims_the_budget_once(tmp_path):
    """The claim came before the request was written: when writing it was refused (another process
    answered an input meanwhile), the rest was claimed again; the store's count, kept for good, grew
    a whole request per refusal, and a run within its budget stopped (3 + 2 > 4 for 2 sent)."""
    me, other = Ledger(tmp_path / "l.sqlite", owner="me"), Ledger(tmp_path / "l.sqlite", owner="other")
    t = _teacher(me, max_queries=4)
    keys, _ = t._text_inputs(["a", "b", "c"])
    claimed = []

    def claimer(n):  # StoreBudget's rule
        if sum(claimed) + n > 4:
            raise BudgetError(f"query budget reached: {sum(claimed)} + {n} > 4")
        claimed.append(n)

    t.budget_from(claimer)
    _answered_between_wait_and_begin(t, other, keys[0])
    t.encode_text(["a", "b", "c"])
    assert t.transport.stats.queries == 2 and claimed == [2]


def test_a_budget_stop_before_the_send_closes_the_written_request(tmp_path):
    me = Ledger(tmp_path / "l.sqlite", owner="me")
    t = _teacher(me, max_queries=1)
    t.budget_from(lambda n: (_ for _ in ()).throw(BudgetError("query budget reached")))
    with pytest.raises(BudgetError):
        t.encode_text(["a", "b"])
    assert me.db.execute("SELECT status FROM requests").fetchall() == [("failed",)]  # nothing went out


def test_a_replay_whose_request_is_refused_is_counted_as_resent_apart(tmp_path):
    """An earlier run's request (sent, its answer lost: maybe charged) is replayed; another process
    answers one of its inputs first, so the request is not sent: not counted as replayed, and the two
    inputs left, going out under a new id, are counted as possibly paid twice."""
    path = tmp_path / "l.sqlite"
    t = _teacher(Ledger(path, owner="me"))
    keys, _ = t._text_inputs(["a", "b", "c"])
    dead = Ledger(path, owner="killed-run")
    dead.begin("r-old", "ctx-text", "text", [(k, 1) for k in keys])
    dead.outcome(dead.sent("r-old", 0), "r-old", "lost:ReadTimeout", lost=True)
    dead.close()
    _answered_between_wait_and_begin(t, Ledger(path, owner="other"), keys[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.encode_text(["a", "b", "c"])
    s = t.transport.stats
    assert (s.replayed_requests, s.possibly_paid_twice, s.queries) == (0, 2, 2)


def test_a_never_sent_request_resent_in_other_batches_is_not_counted_as_paid_twice(tmp_path):
    path = tmp_path / "l.sqlite"
    t = _teacher(Ledger(path, owner="me"))
    keys, _ = t._text_inputs(["a", "b", "c", "d"])
    killed = Ledger(path, owner="killed-run")  # written pending, killed before the send (no send recorded)
    killed.begin("r-old", "ctx-text", "text", [(k, 1) for k in keys])
    killed.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "may be paid twice"
        t.encode_text(["a", "b"])
    assert t.transport.stats.possibly_paid_twice == 0


def test_a_killed_parent_does_not_look_alive_while_its_forked_child_lives(tmp_path):
    """A forked child held a copy of its parent's owner-file lock: the parent killed, its pending
    requests were waited for as a live process's, up to the deadline (36 minutes by default)."""
    code = f"""
import os, time
from embedcache.teachers.remote.ledger import Ledger
led = Ledger({str(tmp_path / 'l.sqlite')!r})
led.begin("r-parent", "ctx", "text", [("k", 1)])
if os.fork() == 0:  # a child doing other work (a DataLoader worker, a pool process)
    time.sleep(20)
    os._exit(0)
print("ready", flush=True)
time.sleep(30)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        assert Ledger(tmp_path / "l.sqlite", owner="me").held_elsewhere(["k"]) == ["k"]  # alive: waited for
        os.kill(parent.pid, signal.SIGKILL)  # the parent only; its child lives on
        parent.wait(10)
        time.sleep(0.2)
        assert Ledger(tmp_path / "l.sqlite", owner="me").held_elsewhere(["k"]) == []
    finally:
        parent.kill()
        parent.wait(10)
        subprocess.run(["pkill", "-f", str(tmp_path / "l.sqlite")], check=False)


def _dead_request(path, keys, rid="r-old"):
    dead = Ledger(path, owner="killed-run")
    dead.begin(rid, "ctx-text", "text", [(k, 1) for k in keys])
    dead.outcome(dead.sent(rid, 0), rid, "lost:ReadTimeout", lost=True)
    dead.close()


def test_a_replay_refused_by_the_budget_is_not_counted_as_replayed_or_paid_twice(tmp_path):
    """An earlier run's possibly charged request is written pending again, then the budget refuses it:
    nothing went out, yet it is counted replayed and (openai: no idempotency key) possibly paid twice."""
    path = tmp_path / "l.sqlite"
    t = _teacher(Ledger(path, owner="me"), max_queries=1)
    keys, _ = t._text_inputs(["a", "b"])
    _dead_request(path, keys)
    t.budget_from(lambda n: (_ for _ in ()).throw(BudgetError("query budget reached")))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(BudgetError):
            t.encode_text(["a", "b"])
    s = t.transport.stats
    assert t.ledger.request_status("r-old") == "pending"  # still possibly charged: fine
    assert (s.replayed_requests, s.possibly_paid_twice) == (0, 0), (s, [str(x.message) for x in w])


def test_inputs_of_a_charged_request_left_after_a_wait_are_counted_paid_twice(tmp_path):
    """A killed run's request R(a, b, c) was possibly charged; another live process is sending 'a' and
    answers it during our wait. b, c go out under a new id (R is not replayed) yet are not counted."""
    path = tmp_path / "l.sqlite"
    t = _teacher(Ledger(path, owner="me"))
    keys, _ = t._text_inputs(["a", "b", "c"])
    _dead_request(path, keys)
    other = Ledger(path, owner="other")
    assert other.begin("r-other", "ctx-text", "text", [(keys[0], 1)]) == []

    def answer_later():
        time.sleep(0.6)
        other.finish("r-other", [keys[0]], np.ones((1, DIM), np.float32))

    th = threading.Thread(target=answer_later)
    th.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.encode_text(["a", "b", "c"])
    th.join()
    s = t.transport.stats
    assert s.queries == 2 and t.ledger.request_status("r-old") == "pending"  # b, c sent under a new id
    assert s.possibly_paid_twice == 2, s


class _FakeTime:
    """time for the teacher module: every poll sleep jumps past the wait deadline."""
    def __init__(self):
        self.now, self.sleeps = 0.0, 0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.sleeps += 1
        self.now += 10_000.0

    def time(self):
        return time.time()


def test_waited_out_keys_are_not_waited_for_again_after_a_too_large_halving(tmp_path, monkeypatch):
    """Another live process holds 'a' pending and never answers. The wait for it runs out once; the
    request (a, b, c, d) gets 413 and is halved: the half holding 'a' waits the whole deadline again."""
    path = tmp_path / "l.sqlite"
    t = _teacher(Ledger(path, owner="me"))

    def answer(request):
        if len(json.loads(request.content)["input"]) > 1:
            return httpx.Response(413, json={"error": {"message": "too many inputs"}})
        return _answer(request)

    t.transport.http = httpx.Client(transport=httpx.MockTransport(answer))
    keys, _ = t._text_inputs(["a", "b", "c", "d"])
    other = Ledger(path, owner="other")
    zkey, _ = t._text_inputs(["z"])  # not ours: its request is not replayed from here as a whole
    assert other.begin("r-stuck", "ctx-text", "text", [(keys[0], 1), (zkey[0], 1)]) == []
    fake = _FakeTime()
    monkeypatch.setattr(teacher_mod, "time", fake)
    t.encode_text(["a", "b", "c", "d"])
    assert t.transport.stats.halvings >= 1
    assert fake.sleeps == 1, f"waited out the deadline {fake.sleeps} times for the same key"


def test_a_budget_stop_on_resending_a_bad_request_keeps_it_counted_as_paid(tmp_path):
    """A request answered with something unusable is closed 'bad' (paid). The rerun writes the same
    request id pending again (begin), then the budget refuses it: it is disowned, left 'pending', and
    the ledger's paid_inputs no longer counts what was paid; the next run replays it as 'possibly paid'."""
    path = tmp_path / "l.sqlite"
    led = Ledger(path, owner="me")
    t = _teacher(led)
    bad = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"data": []})))
    t.transport.http = bad
    with pytest.raises(Exception):
        t.encode_text(["a", "b"])
    before = led.totals()
    assert before["paid_inputs"] == 2
    t2 = _teacher(led, max_queries=2)
    t2.budget_from(lambda n: (_ for _ in ()).throw(BudgetError("query budget reached")))
    with pytest.raises(BudgetError):
        t2.encode_text(["a", "b"])
    assert led.totals()["paid_inputs"] == 2, (led.totals(), led.db.execute("SELECT status, owner FROM requests").fetchall())
    # sent again under an id of its own (the same idempotency key would get the bad answer replayed)
    assert _teacher(led).encode_text(["a", "b"]).shape == (2, DIM)
    assert sorted(r for (r,) in led.db.execute("SELECT status FROM requests")) == ["bad", "done"]
