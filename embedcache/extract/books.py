"""A paid teacher's books in a store: what each extract call spent (``Books``, entries tagged with the call and
summed into the manifest's ``teacher_usage``), and what a call takes over from the store's books before it pays
anything (its budget, the model its earlier answers named, requests an earlier call may have paid for)."""
from __future__ import annotations

from typing import Any

from ..store import USAGE_SNAPSHOTS, Store, is_counter
from ..teachers.remote.errors import BadAnswer
from .budget import StoreBudget


def budget_in_store(store: Store, teacher, teacher_cfg) -> None:
    """A paid teacher's teacher.max_queries as the store's budget (``StoreBudget``)."""
    use = getattr(teacher, "budget_from", None)
    limit = getattr(teacher_cfg, "max_queries", None)
    if callable(use) and limit is not None:
        use(StoreBudget(store, limit))


def models_in_store(store: Store, teacher, prompts) -> None:
    """The model a paid teacher's earlier answers to this store named (its books): every answer now is
    held to it, so a store resumed after the vendor moved its model is refused, not mixed; and so are
    the ledger's answers to its prompts, before any view is paid for."""
    expect = getattr(teacher, "expect_model", None)
    if callable(expect):
        expect((store.usage() or {}).get("answered_model"))
        teacher.check_ledger([t for pc in prompts.values() for texts in pc for t in texts])


def one_model_in_books(store: Store) -> None:
    """The books of a store's calls name one answered model, before its prompts are paid for: shards that
    opened a fresh store before either wrote its books each held only their own first answer's model."""
    models = store.answered_models()
    if len(models) > 1:
        raise BadAnswer(f"the books of {store.path} name answers from models {', '.join(map(repr, models))}: its shards "
                        "began while the service moved its model, and their blocks would mix in one store, so it is "
                        f"not finished. Delete {store.path} and rerun with a new teacher.ledger and a teacher.model "
                        "name that does not move")


def lost_in_store(store: Store, teacher) -> None:
    """Requests an earlier call of the store counted as possibly paid (stopped with a send out, or its
    answer lost): handed to a paid teacher, so that this call's answer to them settles those books."""
    inherit = getattr(teacher, "inherit_lost", None)
    if not callable(inherit):  # a local teacher: no books to read
        return
    lost = (store.usage() or {}).get("lost_requests")
    if isinstance(lost, dict) and lost:
        inherit(lost)


class Books:
    """What a paid teacher spent in one extract call (its ``usage()`` now, less at the start), kept
    in the store as it goes: after every finished block and at the end, an entry of what was spent
    since the last (tagged with the call), so a call killed with -9 has its spending to its last
    block in the store, and the manifest's ``teacher_usage`` sums every call's."""

    def __init__(self, teacher, since_built: bool):
        """``since_built``: the teacher was built for this call (its probes on loading count too)."""
        import uuid

        usage = getattr(teacher, "usage", None)
        self.usage = usage if callable(usage) else None
        self.last = {} if since_built else self.usage() if self.usage else None
        self.call = uuid.uuid4().hex[:12]
        self.opened = False

    def open(self, store: Store) -> None:
        """Mark this call open in the store (closed by ``close``): a call killed with -9 stays open,
        and the store's finish says its books may be low."""
        if self.usage is not None:
            store.open_call(self.call)
            self.opened = True

    def close(self, store: Store) -> None:
        if self.opened:
            try:
                store.close_call(self.call)
            except OSError:  # on the way out of a failure (a full disk): that failure is what to report
                pass
            self.opened = False

    def queries(self) -> int:
        """Queries paid in this call so far, not yet recorded."""
        return int(self.usage().get("queries", 0) - self.last.get("queries", 0)) if self.usage else 0

    def record(self, store: Store, quietly: bool = False) -> None:
        if self.usage is None:
            return
        now = self.usage()
        spent = {k: v if k in USAGE_SNAPSHOTS else _minus(v, self.last.get(k)) for k, v in now.items()}
        if not any(_nonzero(v) for k, v in spent.items() if k not in USAGE_SNAPSHOTS):
            return  # nothing asked of the teacher since the last entry (an intact store)
        try:
            store.add_usage({**spent, "call": self.call})
        except OSError:
            if not quietly:  # on the way out of a failure (a full disk), the failure is what to report
                raise
            return
        self.last = now


def _nonzero(v: Any) -> bool:
    return bool(v) if is_counter(v) else isinstance(v, dict) and any(_nonzero(x) for x in v.values())


def _minus(now: Any, before: Any) -> Any:
    """Counters (and dicts of them, the service's own usage) less their earlier values; others as now."""
    if is_counter(now):
        return now - (before if is_counter(before) else 0)
    if isinstance(now, dict):
        before = before if isinstance(before, dict) else {}
        return {k: _minus(v, before.get(k)) for k, v in now.items()}
    return now
