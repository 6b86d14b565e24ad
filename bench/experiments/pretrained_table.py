"""The README's pretrained-student table (after `embedcache sweep pacs-pretrained` and `embedcache evaluate
--store stores/pacs-conse-lite2.zarr --protocol lodo --out stores/zs-lite2-full.parquet`): out-of-domain top-1 (%) per held-out domain (mean ± std over replicates),
the avg of the four (per replicate, then over replicates), in-domain avg, and how many replicates."""
import glob
import pandas as pd

DOMS = ["art_painting", "cartoon", "photo", "sketch"]
ORDER = ["ce", "linear_probe", "naive_kd", "feat_kd", "li_iccv23", "vl2v_adip", "vl2v_adip_align"]
d = pd.concat([pd.read_parquet(f) for f in glob.glob("sweeps/pacs-pretrained/results/*.parquet")])
d = d[d.metric == "top1"]
ood = d[(d.split == "out_of_domain") & d.domain.isin(DOMS)]
ind = d[(d.split == "in_domain") & (d.domain == "avg")]


def cell(v):
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else (f"{100 * v.mean():.1f}" if len(v) else "-")


z = pd.read_parquet("stores/zs-lite2-full.parquet")
z = z[(z.metric == "top1") & (z.source == "name")].set_index("domain").value
print("| recipe | " + " | ".join(DOMS) + " | OOD avg | in-domain avg | replicates |")
print("|---|" + "---:|" * (len(DOMS) + 3))
print("| teacher zero-shot (Lite2, name) | " + " | ".join(f"{100 * z[x]:.1f}" for x in DOMS) + f" | {100 * z[DOMS].mean():.1f} | | |")
for r in ORDER:
    o = ood[ood.recipe == r]
    if o.empty:
        continue
    per = o.pivot_table(index="replicate", columns="domain", values="value")
    full = per.reindex(columns=DOMS).dropna()  # replicates with all four held-out domains
    avg = full[DOMS].mean(axis=1) if set(DOMS) <= set(full.columns) else pd.Series(dtype=float)
    i = ind[ind.recipe == r].groupby("replicate").value.mean()
    reps = ", ".join(f"{c[:3]}:{per[c].notna().sum()}" for c in DOMS if c in per)
    print(f"| {r} | " + " | ".join(cell(per[c].dropna()) if c in per else "-" for c in DOMS)
          + f" | {cell(avg)} | {cell(i)} | {len(full)} of 3 |")
