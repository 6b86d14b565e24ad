"""What every benchmark shares: where its JSON goes, and each figure said as soon as it is measured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def measured(rows: list, what: str, rate: float, ratio: float) -> None:
    """Append a (what, rate, ratio) row and print it at once: a benchmark stopped by its time limit
    (bench/gpu_run.sh) still leaves the figures it measured in its log."""
    rows.append((what, rate, ratio))
    print(f"  measured: {what}: {rate:,.2f} ({ratio:.3f} of its baseline)", flush=True)
