"""Cost measurements persist across processes: a second process on the same machine and target times nothing and
gives the same output; another target, or the store turned off, measures afresh."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, "tests")
from conftest import make_tiny_target
os.environ["HF_JETSPEC_MEASUREMENTS"] = sys.argv[2]  # conftest turns the store off for the test session
from hf_jetspec import JetSpecHead
import hf_jetspec.packed_linear, hf_jetspec.planning, hf_jetspec.projection
timed = []
real = hf_jetspec.planning.median_seconds
def spy(*args, **kwargs):
    timed.append(1)
    return real(*args, **kwargs)
hf_jetspec.planning.median_seconds = hf_jetspec.projection.median_seconds = hf_jetspec.packed_linear.median_seconds = spy
target = make_tiny_target("qwen3", seed=int(sys.argv[1]))
head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4)
out = target.generate(torch.tensor([[5, 17, 42, 8, 61]]), do_sample=False, max_new_tokens=16, assistant_model=head,
                      tree_budget="auto")
print(json.dumps({"timed": len(timed), "tokens": out.tolist()}))
"""


def run(store, seed: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(seed), str(store)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_first_ones_measurements(tmp_path):
    store = tmp_path / "store"
    first = run(store)
    assert first["timed"] > 0 and any(p.name.startswith("batch_cost-") for p in store.iterdir())
    second = run(store)
    assert second["timed"] == 0 and second["tokens"] == first["tokens"]
    same_shape = run(store, seed=2)  # other weights, same config: the same costs
    assert same_shape["timed"] == 0
    for path in store.glob("*.json"):  # a corrupt file is measured over, not trusted
        path.write_text("{not json")
    assert run(store)["timed"] > 0


def test_the_store_turned_off_keeps_nothing(tmp_path):
    assert run("off")["timed"] > 0 and run("off")["timed"] > 0
    assert not (tmp_path / "store").exists()


def test_where_a_model_or_head_was_loaded_from_is_not_part_of_the_key():
    """The same head loaded by a relative and an absolute path (or the target from another folder) is the same
    measurement; checked because a benchmark's workers and a script in the same checkout re-measured (10 s) before."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_target

    from hf_jetspec import JetSpecHead, measurements

    target = make_tiny_target("qwen3")
    head = JetSpecHead.from_target(target, num_hidden_layers=1)
    before = measurements.key("batch_cost", target), measurements.config_fingerprint(head.config)
    target.config._name_or_path, head.config._name_or_path = "/somewhere/target", "heads/some-head"
    assert (measurements.key("batch_cost", target), measurements.config_fingerprint(head.config)) == before
    head.config.block_size += 1
    assert measurements.config_fingerprint(head.config) != before[1]
