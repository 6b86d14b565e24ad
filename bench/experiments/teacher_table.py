"""The README's per-classifier table: the conse teacher's zero-shot top-1 (%) on the balanced PACS subset
(50 images per domain and class, so top-1 equals mean per-class accuracy), after teacher_zeroshot.sh."""
import pandas as pd
from pathlib import Path
DOMS = ["art_painting", "cartoon", "photo", "sketch"]
print("| classifier (input) | text | art_painting | cartoon | photo | sketch | avg |")
print("|---|---|---:|---:|---:|---:|---:|")
for m, size in [("lite0", 224), ("lite1", 240), ("lite2", 260)]:
    f = Path(f"stores/zs50-{m}.parquet")
    if not f.exists():
        continue
    d = pd.read_parquet(f)
    for src in ["name", "templates", "attributes"]:
        t = d[(d.source == src) & (d.metric == "top1")].set_index("domain").value * 100
        print(f"| EfficientNet-{m.capitalize()} ({size} px) | {src} | " + " | ".join(f"{t[x]:.1f}" for x in DOMS)
              + f" | {t[DOMS].mean():.1f} |")
