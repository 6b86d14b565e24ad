"""Whole-array reads with their check folded in: each row block is read piece by piece and each
piece checked right after it is read; a few threads take the blocks in turn, so one thread's read (the
kernel's copy, which releases the GIL) runs while another checks (the CRC-32C holds the GIL). Where the
page cache reads at about the CRC's own speed from memory (9 GB/s, the AMD EPYC of 2026-12-03),
reading the whole array and then checking it took twice the read alone (0.45-0.51x of np.load); this
way 0.61-0.78x in the same session (bench/extract.py's load-all figure, README).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

PIECE_BYTES = 8 << 20  # a piece costs far more than its call and its turn at the GIL (4-16 MB measured alike)
THREADS = max(2, min(4, os.cpu_count() or 1))  # reading threads; the kernel's copies scale, the check does not


@dataclass(frozen=True)
class Piece:
    part: int  # which of the checked parts (a row block) it belongs to
    lo: int
    hi: int
    last: bool  # the part's last piece: its checksum is complete


def plan_pieces(parts: Sequence[Tuple[int, int]], row_bytes: int, chunk_rows: int, whole_chunks: bool) -> List[List[Piece]]:
    """Each part ``(start, stop)`` cut into pieces of about PIECE_BYTES, in order, never across a part's
    end. ``whole_chunks``: pieces of whole chunks (a compressed array decodes a chunk whole, so a chunk
    cut in two would be decoded twice); parts then start on chunk boundaries (blocks tile chunks)."""
    rows = max(1, PIECE_BYTES // max(1, row_bytes))
    if whole_chunks:
        rows = max(chunk_rows, rows // chunk_rows * chunk_rows)
    return [[Piece(i, lo, min(stop, lo + rows), lo + rows >= stop) for lo in range(start, stop, rows)]
            for i, (start, stop) in enumerate(parts)]


def read_parts(parts: Sequence[Sequence[Piece]], fill: Callable[[int, int], None],
               check: Callable[[Piece], None], threads: int = 0) -> None:
    """``fill(lo, hi)`` then ``check(piece)`` for each piece of a part in order, parts spread over
    ``threads`` threads (default THREADS), each part on one thread. An error stops every thread within
    the piece it is on, and so does Ctrl-C here; the error of the lowest part that failed is raised,
    and no thread is left running when this returns or raises."""
    threads = min(threads or THREADS, len(parts))
    if threads <= 1:
        for part in parts:
            for p in part:
                fill(p.lo, p.hi)
                check(p)
        return
    stop = threading.Event()
    errors: Dict[int, BaseException] = {}

    def work(i: int) -> None:
        try:
            for p in parts[i]:
                if stop.is_set():
                    return
                fill(p.lo, p.hi)
                check(p)
        except BaseException as exc:  # raised on the calling thread below
            errors[i] = exc
            stop.set()

    pool = ThreadPoolExecutor(threads, thread_name_prefix="embedcache-read")
    try:
        for done in [pool.submit(work, i) for i in range(len(parts))]:
            done.result()
    finally:
        stop.set()  # Ctrl-C while waiting: the threads stop at their next piece
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise errors[min(errors)]
