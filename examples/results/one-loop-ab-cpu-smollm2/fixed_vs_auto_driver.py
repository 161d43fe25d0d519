"""Two code trees side by side at a fixed tree budget and at "auto" (per-phase ms per round from the stats): a fixed
budget verifies the same trees in both, so it isolates a round's mechanics from the per-round choices.

    BEFORE=/tmp/before AFTER=$PWD python examples/results/one-loop-ab-cpu-smollm2/fixed_vs_auto_driver.py \
        mt_bench 6 128 '[16, "auto"]' out.json
"""
import json, os, subprocess, sys
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
from hf_jetspec.bench import load_eval_prompts, DEFAULT_EVAL_DIR
sets, limit, new, budgets, out = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
def worker(root):
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "2"}
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "fixed_vs_auto_worker.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    print(root, p.stdout.readline().strip(), flush=True)
    return p
workers = {"before": worker(os.environ["BEFORE"]), "after": worker(os.environ["AFTER"])}
def ask(name, prompt, budget):
    w = workers[name]; w.stdin.write(json.dumps({"prompt": prompt, "new": new, "budget": budget}) + "\n"); w.stdin.flush()
    return json.loads(w.stdout.readline())
prompts = load_eval_prompts(DEFAULT_EVAL_DIR, sets, limit)
recs = []
keys = ["rounds", "time_draft", "time_verify", "time_accept", "time_cache", "time_prefill", "time_total"]
for i, p in enumerate(prompts):
    for b in budgets:
        order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
        r = {"dataset": p["dataset"], "budget": b}
        for a in order:
            r[a] = ask(a, p["prompt"], b)
        r["equal"] = r["before"]["tokens"] == r["after"]["tokens"]
        recs.append(r)
        print(i, b, r["equal"], {a: (round(len(r[a]["tokens"]) / r[a]["seconds"], 2), r[a]["rounds"], round(r[a]["tau"], 2), round(r[a]["mean_tree"], 1),
              {k[5:]: round(1000 * r[a][k] / r[a]["rounds"], 1) for k in keys[1:]}) for a in ("before", "after")}, flush=True)
json.dump(recs, open(out, "w"))
for b in budgets:
    sub = [r for r in recs if r["budget"] == b]
    for a in ("before", "after"):
        rounds = sum(r[a]["rounds"] for r in sub)
        print(b, a, "tok/s", round(sum(len(r[a]["tokens"]) for r in sub) / sum(r[a]["seconds"] for r in sub), 2), "rounds", rounds,
              {k: round(1000 * sum(r[a][k] for r in sub) / rounds, 2) for k in keys[1:]})
