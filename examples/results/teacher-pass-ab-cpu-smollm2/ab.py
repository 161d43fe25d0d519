"""A/B of the teacher pass: labels at every position (before) against response positions only (after).

The same 64 corpus rows (seeded sample of the committed corpus' train split), batches of 4 as `compute_teacher_features`
forms them, each batch timed with both versions back to back, the order alternating; ratio of summed times with a 95%
bootstrap CI over batches. Checks that the labels at response positions agree.
Run from the repository root: python examples/results/teacher-pass-ab-cpu-smollm2/ab.py <before-commit>
"""

import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_jetspec.cpu import cpu_class
from hf_jetspec_training.corpus import load_corpus
from hf_jetspec_training.resources import resolve_corpus
from hf_jetspec_training.train import load_target

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)


def load_version(source: str, name: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BEFORE_REV = sys.argv[1] if len(sys.argv) > 1 else "HEAD"  # the commit whose training/features.py is "before"
before = load_version(subprocess.check_output(["git", "show", f"{BEFORE_REV}:training/features.py"]).decode(), "before")
after = load_version(Path("training/features.py").read_text(), "after")
rows = [dict(r) for r in load_corpus(resolve_corpus("training/corpora/smollm2-135m-instruct"))]
rows = random.Random(0).sample(rows, 64)
target, _ = load_target("default", torch.float32)  # as jetspec-train loads it
layers = [1, 14, 27]
times = {"before": [], "after": []}
mismatched = 0
with tempfile.TemporaryDirectory() as tmp:
    for index in range(0, len(rows), 4):
        batch = rows[index : index + 4]
        order = [("before", before), ("after", after)]
        if index // 4 % 2:
            order.reverse()
        for name, module in order:
            start = time.perf_counter()
            module.compute_teacher_features(target, batch, Path(tmp) / name, layers, topk=32)
            times[name].append(time.perf_counter() - start)
        for row in batch:
            a = load_file(str(before.feature_path(Path(tmp) / "before", row["id"])))
            b = load_file(str(after.feature_path(Path(tmp) / "after", row["id"])))
            p = row["prompt_length"]
            same_ids = torch.equal(a["teacher_ids"][p:], b["teacher_ids"][p:])
            close = torch.allclose(a["teacher_probs"][p:].float(), b["teacher_probs"][p:].float(), atol=1e-3)
            mismatched += not (same_ids and close and torch.equal(a["taps"], b["taps"]))
ratios = []
generator = random.Random(1)
n = len(times["before"])
for _ in range(2000):
    pick = [generator.randrange(n) for _ in range(n)]
    ratios.append(sum(times["before"][i] for i in pick) / sum(times["after"][i] for i in pick))
ratios.sort()
result = {"before": subprocess.check_output(["git", "rev-parse", BEFORE_REV]).decode().strip(), "rows": len(rows), "batches": n, "cpu_class": cpu_class(), "threads": torch.get_num_threads(),
          "before_s": round(sum(times["before"]), 2), "after_s": round(sum(times["after"]), 2),
          "speedup": round(sum(times["before"]) / sum(times["after"]), 3),
          "speedup_ci95": [round(ratios[50], 3), round(ratios[1949], 3)],
          "rows_with_different_labels_or_taps": mismatched, "per_batch_s": times}
print(json.dumps({k: v for k, v in result.items() if k != "per_batch_s"}, indent=1))
(HERE / "results.json").write_text(json.dumps(result, indent=1))
