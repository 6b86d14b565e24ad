"""What every benchmark shares: where its JSON goes."""
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
