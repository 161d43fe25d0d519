"""Training curves: loss, depth-1 agreement and tau against wall-clock minutes, from a trainer's log history."""

from __future__ import annotations

import json
from pathlib import Path


def training_curve(log_history: list[dict]) -> dict[str, list[dict]]:
    """Splits a `TrainerState.log_history` into the series a curve needs, each point with `step` and `train_minutes`
    (points logged before the clock existed are dropped)."""
    series = {"loss": [], "top1_depth1": [], "eval_top1_depth1": [], "tau": []}
    for entry in log_history:
        if "train_minutes" not in entry:
            continue
        for key in series:
            if key in entry:
                series[key].append({"step": entry["step"], "train_minutes": entry["train_minutes"], key: entry[key]})
    return series


def save_training_curve(log_history: list[dict], output_dir: str | Path) -> tuple[Path, Path | None]:
    """Writes `training_curve.json` and, when matplotlib is installed, `training_curve.png` into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    series = training_curve(log_history)
    json_path = output_dir / "training_curve.json"
    json_path.write_text(json.dumps(series, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    tau = series["tau"]
    figure, axes = plt.subplots(1, 2 if tau else 1, figsize=(10 if tau else 6, 3.8), squeeze=False)
    axes = axes[0]
    loss = series["loss"]
    axes[0].plot([p["train_minutes"] for p in loss], [p["loss"] for p in loss], color="tab:blue")
    axes[0].set(xlabel="training wall clock (minutes)", ylabel="loss (cross-entropy to target)", title="loss")
    accuracy = series["top1_depth1"]
    if accuracy:
        twin = axes[0].twinx()
        twin.plot([p["train_minutes"] for p in accuracy], [p["top1_depth1"] for p in accuracy], color="tab:orange",
                  alpha=0.7)
        held = series["eval_top1_depth1"]
        if held:  # the corpus' validation split: rows the head never trained on
            twin.plot([p["train_minutes"] for p in held], [p["eval_top1_depth1"] for p in held], color="tab:red",
                      marker="o", label="validation rows")
            twin.legend(loc="lower right")
        twin.set_ylabel("depth-1 top-1 agreement", color="tab:orange")
    if tau:  # (runs without `tau_eval_steps` have none: no empty panel)
        axes[1].plot([p["train_minutes"] for p in tau], [p["tau"] for p in tau], marker="o", color="tab:green")
        axes[1].set(xlabel="training wall clock (minutes)", ylabel="tau (tokens per target forward)",
                    title="tau on held-out prompts, real generate()")
    figure.tight_layout()
    png_path = output_dir / "training_curve.png"
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return json_path, png_path
