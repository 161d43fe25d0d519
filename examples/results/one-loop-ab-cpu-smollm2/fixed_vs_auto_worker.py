import json, os, sys, time, torch, dataclasses
torch.set_num_threads(2)
import hf_jetspec
from hf_jetspec import JetSpecHead
model, tok = hf_jetspec.load_default_target()
head = JetSpecHead.from_pretrained(os.path.join(os.getcwd(), "heads", "smollm2-135m-instruct-jetspec"))  # cwd: the code tree
ids0 = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
for m in range(3):
    model.generate(ids0, max_new_tokens=32, do_sample=False, assistant_model=head)
print(json.dumps({"ready": hf_jetspec.__file__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = tok.apply_chat_template([{"role": "user", "content": req["prompt"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    kw = {} if req["budget"] is None else {"assistant_model": head, "tree_budget": req["budget"]}
    t = time.perf_counter()
    o = model.generate(ids, max_new_tokens=req["new"], do_sample=False, **kw)
    dt = time.perf_counter() - t
    r = {"tokens": o[0, ids.shape[1]:].tolist(), "seconds": dt}
    if kw:
        st = head.last_generate_stats
        r.update({k: v for k, v in dataclasses.asdict(st).items() if not isinstance(v, list)})
        r["tau"] = st.mean_accepted_length; r["mean_tree"] = st.mean_tree_size
    print(json.dumps(r), flush=True)
