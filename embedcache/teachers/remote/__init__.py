"""The ``remote`` teacher (a pay-per-query embedding service) and its protocol registry.

``teacher.name=remote`` with ``teacher.protocol`` one of ``embedcache`` (this project's ``serve``),
``openai`` (OpenAI-style embeddings with an image modality, as infinity serves CLIP) and
``cohere-v2``. The ledger, budget, retries, rate limits and cache key are shared; each protocol is
one adapter in ``protocols.py``.
"""
from .errors import RemoteError, RemoteUnavailableError
from .ledger import Ledger
from .protocols import PROTOCOLS, Protocol
from .teacher import RemoteTeacher

__all__ = ["PROTOCOLS", "Protocol", "RemoteTeacher", "Ledger", "RemoteError", "RemoteUnavailableError"]
