"""Side by side: two code trees of hf_jetspec (BEFORE and AFTER, e.g. `git worktree add /tmp/before <rev>`), plain
generate() as the baseline, one worker process per code tree, requests interleaved in rotating order (one at a time).

    BEFORE=/tmp/before AFTER=$PWD python examples/results/one-loop-ab-cpu-smollm2/driver.py 2 10 128 out.json

Arguments: threads, prompts per set (GSM8K, MT-Bench), new tokens, output file. Batches of 4 follow (BATCHES=0: none;
BATCH_REPS=N: N passes over the batches; BATCH_SIZE=N: rows per batch, default 4; SINGLES=0: batches only).
"""
import json, os, random, subprocess, sys
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
from hf_jetspec.bench import load_eval_prompts, DEFAULT_EVAL_DIR
threads, limit, new, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
head = os.path.join(ROOT, "heads", "smollm2-135m-instruct-jetspec")
def worker(root):
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), str(threads), head], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    ready = json.loads(p.stdout.readline()); print(root, ready, flush=True)
    return p
workers = {"before": worker(os.environ["BEFORE"]), "after": worker(os.environ["AFTER"])}
def ask(name, method, prompt):
    w = workers[name]
    w.stdin.write(json.dumps({"method": method, "prompt": prompt, "new": new}) + "\n"); w.stdin.flush()
    return json.loads(w.stdout.readline())
arms = [("plain", "before", "plain"), ("before", "before", "jetspec"), ("after", "after", "jetspec")]
prompts = load_eval_prompts(DEFAULT_EVAL_DIR, ["gsm8k_test", "mt_bench"], limit)
recs = []
for i, p in enumerate(prompts if os.environ.get("SINGLES", "1") == "1" else []):
    order = arms[i % 3:] + arms[:i % 3]
    r = {"dataset": p["dataset"], "id": p["id"]}
    for arm, w, method in order:
        r[arm] = ask(w, method, p["prompt"])
    r["equal"] = r["plain"]["tokens"] == r["before"]["tokens"] == r["after"]["tokens"]
    recs.append(r)
    print(i, p["dataset"], r["equal"], {a: round(len(r[a]["tokens"]) / r[a]["seconds"], 2) for a, _, _ in arms},
          {a: r[a]["tau"] and round(r[a]["tau"], 2) for a in ("before", "after")}, r["after"]["speculated"], flush=True)
def ratio(a, b, subset):
    def stat(idx):
        ta = sum(len(subset[j][a]["tokens"]) for j in idx) / sum(subset[j][a]["seconds"] for j in idx)
        tb = sum(len(subset[j][b]["tokens"]) for j in idx) / sum(subset[j][b]["seconds"] for j in idx)
        return ta / tb
    rng = random.Random(0); n = len(subset)
    boots = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(2000))
    return [round(stat(range(n)), 4), round(boots[49], 4), round(boots[1949], 4)]
summary = {}
for ds in ("gsm8k_test", "mt_bench", "all") if recs else ():
    sub = [r for r in recs if ds == "all" or r["dataset"] == ds]
    sub = [r for r in sub if r["before"]["tau"] is not None and r["after"]["tau"] is not None]
    summary[ds] = {"after/before": ratio("after", "before", sub), "before/plain": ratio("before", "plain", sub),
                   "after/plain": ratio("after", "plain", sub),
                   "tau_before": sum(r["before"]["tau"] for r in sub) / len(sub),
                   "tau_after": sum(r["after"]["tau"] for r in sub) / len(sub), "prompts": len(sub)}
summary["all_equal"] = all(r["equal"] for r in recs)
# batches of BATCH_SIZE (default 4) from the same prompts: before vs after, plain as the baseline
batch_recs = []
size = int(os.environ.get("BATCH_SIZE", "4"))
groups = [prompts[i:i + size] for i in range(0, len(prompts) - size + 1, size)] if os.environ.get('BATCHES', '1') == '1' else []
for rep in range(int(os.environ.get("BATCH_REPS", "1"))):
    for g, group in enumerate(groups):
        order = arms[(g + rep) % 3:] + arms[:(g + rep) % 3]
        r = {}
        for arm, w, method in order:
            wk = workers[w]
            wk.stdin.write(json.dumps({"method": method, "prompts": [p["prompt"] for p in group], "new": new}) + "\n"); wk.stdin.flush()
            r[arm] = json.loads(wk.stdout.readline())
            r[arm]["tokens_list"] = r[arm].pop("tokens")
            r[arm]["tokens"] = [0] * r[arm]["count"]
        r["equal"] = r["plain"]["tokens_list"] == r["before"]["tokens_list"] == r["after"]["tokens_list"]
        batch_recs.append(r)
        print(f"batch{size}", g, r["equal"], {a: round(r[a]["count"] / r[a]["seconds"], 2) for a, _, _ in arms},
              {a: r[a]["tau"] and round(r[a]["tau"], 2) for a in ("before", "after")}, flush=True)
summary[f"batch{size}"] = {} if not batch_recs else {"after/before": ratio("after", "before", batch_recs), "before/plain": ratio("before", "plain", batch_recs),
                     "after/plain": ratio("after", "plain", batch_recs), "calls": len(batch_recs),
                     "all_equal": all(r["equal"] for r in batch_recs)}
print(json.dumps(summary, indent=1))
json.dump({"summary": summary, "records": recs, "batch_records": batch_recs, "threads": threads, "new_tokens": new}, open(out, "w"))
for w in workers.values(): w.stdin.close()
