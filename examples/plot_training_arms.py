"""Training arms side by side: validation depth-1 agreement and training loss against this run's minutes.

Reads each arm's `training_curve.json` (written by `jetspec-train`) and its head's `config.json` (the validation
measurement after training, in the recipe). Arms that continue one head share its history: only the points of each
arm's own last run (after the minutes its recipe had before that run) are drawn, against that run's minutes.

Usage:
    python examples/plot_training_arms.py --arms "1 layer=outputs/ablation-long/l1" "2 layers=outputs/ablation-long/l2" \\
        --output-dir examples/results/ablation-long-cpu-smollm2
Writes `arms.json` and `arms.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_arm(folder: Path) -> dict:
    curve = json.loads((folder / "training_curve.json").read_text())
    config = json.loads((folder / "final" / "config.json").read_text())
    recipe = config["training_recipe"]
    run = recipe["runs"][-1]
    start = recipe["train_minutes"] - run["train_minutes"]
    return {"curve": curve, "run": run, "start_minutes": start, "validation": recipe.get("validation"),
            "layers": config["num_hidden_layers"]}


def moving_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` before it."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", required=True, help="NAME=run folder (with training_curve.json, final/)")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    arms = {}
    for spec in args.arms:
        name, folder = spec.split("=", 1)
        arms[name] = load_arm(Path(folder))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, arm in arms.items():
        start = arm["start_minutes"]
        points = [p for p in arm["curve"]["eval_top1_depth1"] if p["train_minutes"] > start + 1e-6]
        summary[name] = {
            "layers": arm["layers"],
            "steps": arm["run"]["steps"],
            "minutes": arm["run"]["train_minutes"],
            "command": arm["run"]["command"],
            "validation_after_training": arm["validation"],
            "eval_top1_depth1": [{"step": p["step"], "minutes": round(p["train_minutes"] - start, 2),
                                  "value": p["eval_top1_depth1"]} for p in points],
        }
    (out / "arms.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in arms.items():
        start = arm["start_minutes"]
        row = summary[name]
        xs = [p["minutes"] for p in row["eval_top1_depth1"]] + [row["minutes"]]
        ys = [p["value"] for p in row["eval_top1_depth1"]] + [row["validation_after_training"]["top1_depth1"]]
        left.plot(xs, ys, marker="o", label=name)
        losses = [p for p in arm["curve"]["loss"] if p["train_minutes"] > start + 1e-6]
        right.plot([p["train_minutes"] - start for p in losses], moving_mean([p["loss"] for p in losses], 10),
                   label=name)
    left.set(xlabel="minutes of this run", ylabel="depth-1 agreement, 150 validation rows",
             title="validation agreement")
    right.set(xlabel="minutes of this run", ylabel="training loss (moving mean of 10 logs)", title="training loss")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=120)
    print(json.dumps({name: {k: row[k] for k in ("layers", "steps", "minutes", "validation_after_training")}
                      for name, row in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
