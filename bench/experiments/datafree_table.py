"""The README's data-free table (after `bash bench/experiments/datafree.sh eval|synth|photo|students|score`):
top-1 (%) on the real PACS evaluation store, mean ± std over the 3 student seeds, with the teacher's
top-1 on each store's own training images and each synthesised store's style statistics."""
from pathlib import Path

import numpy as np
import pandas as pd

import embedcache

D = Path("stores/datafree")
DOMS = ["art_painting", "cartoon", "photo", "sketch"]
ROWS = [("plain", "synthesised, `plain`"), ("mix", "synthesised, `mix` (Mix-Prompt)"),
        ("random", "synthesised, `random` (Random-Prompt)"),
        ("contrastive", "synthesised, `contrastive` (Contrastive-Prompt)"), ("photo", "56 real photos")]


def store_columns(name: str) -> list:
    """Teacher top-1 on the store's own images (view 0), and spread / class fidelity of its styles."""
    with embedcache.open_store(str(D / f"pacs-{name}.zarr")) as s:
        emb = s.image_emb(view=0).astype(np.float32)
        acc = ((emb @ s.class_emb("name").T).argmax(1) == s.meta.label.to_numpy()).mean()
        plan = s.manifest.get("synthesis_plan")
    return [f"{100 * acc:.1f}", f"{plan['spread']:.2f} / {plan['class_fidelity']:.2f}" if plan else ""]


def main() -> None:
    t = pd.read_parquet(D / "results-teacher.parquet")
    t = t[(t.metric == "top1") & (t.source == "name")].set_index("domain").value
    print("| students trained on | " + " | ".join(DOMS) + " | avg | teacher top-1 on the training images "
          "| style spread / class fidelity |")
    print("|---|---|---|---|---|---|---|---|")
    print("| (teacher zero-shot, no student) | " + " | ".join(f"{100 * t[d]:.1f}" for d in DOMS)
          + f" | {100 * t[DOMS].mean():.1f} | | |")
    for name, label in ROWS:
        f = D / f"results-{name}.parquet"
        if not f.exists():
            continue
        r = pd.read_parquet(f)
        r = r[(r.metric == "top1") & r.domain.isin(DOMS)].pivot_table(index="replicate", columns="domain",
                                                                      values="value") * 100
        r["avg"] = r[DOMS].mean(axis=1)
        cells = [f"{r[c].mean():.1f} ± {r[c].std(ddof=1):.1f}" for c in DOMS + ["avg"]]
        print(f"| {label} | " + " | ".join(cells + store_columns(name)).rstrip() + " |")


if __name__ == "__main__":
    main()
