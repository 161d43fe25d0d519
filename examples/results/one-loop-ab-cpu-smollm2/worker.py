import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import hf_jetspec
from hf_jetspec import JetSpecHead
model, tok = hf_jetspec.load_default_target()
head = JetSpecHead.from_pretrained(sys.argv[2])
def run(method, ids, new):
    kw = {} if method == "plain" else {"assistant_model": head}
    t = time.perf_counter()
    o = model.generate(ids, max_new_tokens=new, do_sample=False, **kw)
    dt = time.perf_counter() - t
    st = head.last_generate_stats if method != "plain" else None
    return {"tokens": o[0, ids.shape[1]:].tolist(), "seconds": dt,
            "tau": None if st is None else st.mean_accepted_length,
            "speculated": None if st is None else getattr(st, "speculated", True)}
ids0 = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
for m in ("plain", "jetspec", "jetspec", "jetspec", "plain"):
    run(m, ids0, 32)
print(json.dumps({"ready": hf_jetspec.__file__}), flush=True)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
def run_batch(method, prompts, new):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = {} if method == "plain" else {"assistant_model": head}
    t = time.perf_counter()
    o = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    dt = time.perf_counter() - t
    st = head.last_generate_stats if method != "plain" else None
    gen = o[:, enc["input_ids"].shape[1]:]
    ntok = int((gen != tok.pad_token_id).sum())
    return {"tokens": gen.tolist(), "count": ntok, "seconds": dt, "tau": None if st is None else st.mean_accepted_length,
            "speculated": None if st is None else st.speculated}
for line in sys.stdin:
    req = json.loads(line)
    if "prompts" in req:
        print(json.dumps(run_batch(req["method"], req["prompts"], req["new"])), flush=True)
        continue
    ids = tok.apply_chat_template([{"role": "user", "content": req["prompt"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    print(json.dumps(run(req["method"], ids, req["new"])), flush=True)
