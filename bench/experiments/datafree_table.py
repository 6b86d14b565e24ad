"""The README's data-free table (after bash bench/experiments/datafree.sh ...): top-1 (%) on the real PACS evaluation store, mean +- std over the 3 student seeds."""
import pandas as pd
from pathlib import Path

D = Path("stores/datafree")
DOMS = ["art_painting", "cartoon", "photo", "sketch"]
rows = []
t = pd.read_parquet(D / "results-teacher.parquet")
t = t[(t.metric == "top1") & (t.source == "name")].set_index("domain").value
rows.append(("teacher zero-shot (no student)", *[f"{100 * t[d]:.1f}" for d in DOMS], f"{100 * t[DOMS].mean():.1f}", "", "", ""))
for name, label in [("plain", "data-free, plain"), ("mix", "data-free, Mix-Prompt"), ("random", "data-free, Random-Prompt"),
                    ("contrastive", "data-free, Contrastive-Prompt"), ("photo", "real photos (56)")]:
    f = D / f"results-{name}.parquet"
    if not f.exists():
        continue
    r = pd.read_parquet(f)
    r = r[(r.metric == "top1") & r.domain.isin(DOMS)].pivot_table(index="replicate", columns="domain", values="value") * 100
    r["avg"] = r[DOMS].mean(axis=1)
    cells = [f"{r[c].mean():.1f} ± {r[c].std(ddof=1):.1f}" for c in DOMS + ["avg"]]
    extra = ["", "", ""]
    store = D / f"pacs-{name}.zarr"
    import embedcache, numpy as np
    with embedcache.open_store(str(store)) as s:
        e = s.image_emb(view=0).astype(np.float32)
        acc = ((e @ s.class_emb("name").T).argmax(1) == s.meta.label.to_numpy()).mean()
        syn = s.manifest.get("synthesis", {})
        plan = s.manifest.get("synthesis_plan", {})
        extra = [f"{100 * acc:.1f}", f"{plan['spread']:.2f} / {plan['class_fidelity']:.2f}" if plan else "-",
                 ", ".join(syn.get("leaks_test_domains", [])) or "-"]
    rows.append((label, *cells, *extra))
print("| students trained on | art_painting | cartoon | photo | sketch | avg | teacher top-1 on the training images | style spread / class fidelity | prompt words naming a test domain |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
