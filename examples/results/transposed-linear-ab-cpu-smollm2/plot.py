"""Plots results-*.json of this folder: JetSpec's tokens/s over plain generate() before and after the transposed
linears, per set and CPU class, with 95% bootstrap CIs. `python plot.py` writes speedup.png."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
classes = {"AVX-512 (native)": "results-avx512.json", "AVX2 (capped)": "results-avx2-cap.json"}
sets = {"gsm8k_test": "GSM8K", "mt_bench": "MT-Bench", "all": "both"}
fig, axes = plt.subplots(1, len(classes), figsize=(10, 3.8), sharey=True)
for ax, (name, file) in zip(axes, classes.items()):
    summary = json.load(open(os.path.join(HERE, file)))["summary"]
    for offset, (arm, label) in zip((-0.18, 0.18), (("before/plain", "before (a65b148)"), ("after/plain", "after"))):
        xs = [i + offset for i in range(len(sets))]
        points = [summary[key][arm] for key in sets]
        ax.bar(xs, [p[0] for p in points], width=0.34, label=label,
               yerr=[[p[0] - p[1] for p in points], [p[2] - p[0] for p in points]], capsize=3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sets)), list(sets.values()))
    ax.set_title(f"2-core AMD EPYC, {name}")
axes[0].set_ylabel("tokens/s over plain generate()")
axes[0].legend(loc="upper right")
fig.suptitle("SmolLM2-135M-Instruct + shipped head, defaults, greedy, 128 tokens, 10+10 prompts")
fig.tight_layout()
fig.savefig(os.path.join(HERE, "speedup.png"), dpi=110)
