"""The CPU class the fast paths see (`hf_jetspec.cpu`): the hardware's, capped by the process's ISA settings, so an
AVX2-class CPU can be emulated on a bigger one; greedy output stays exact under the emulation."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from hf_jetspec.cpu import avx2_emulation_env, cpu_class

ROOT = Path(__file__).resolve().parents[1]
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 CPU classes")


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def run(code: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@x86
def test_class_matches_the_cpu_flags():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    expected = ("AMX" if {"amx_tile", "avx512_bf16"} <= flags else "AVX-512" if "avx512f" in flags
                else "AVX2" if "avx2" in flags else "other")
    assert cpu_class() == expected


@x86
def test_avx2_emulation_caps_the_class_and_turns_the_bf16_paths_off_with_exact_output():
    """Checked by breaking it: with `cpu_class` ignoring both caps (PyTorch's kernel level and oneDNN's ISA) the class
    stays "AVX-512" and the test fails. The bf16 paths follow a measured bf16 matmul (3.5x uncapped on this AVX-512
    BF16 box, 0.37x capped): forcing the measurement to 3.5 under the cap fails the bf16 assertion."""
    if "avx2" not in cpu_flags():
        pytest.skip("needs an AVX2 CPU")
    out = run("""
import json, torch, sys
sys.path.insert(0, "tests")
from conftest import make_tiny_target
from hf_jetspec import JetSpecHead
from hf_jetspec.cpu import cpu_description
target = make_tiny_target("qwen3", seed=1)
head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
prompt = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])
same = target.generate(prompt, do_sample=False, max_new_tokens=24, assistant_model=head).tolist() == \\
    target.generate(prompt, do_sample=False, max_new_tokens=24).tolist()
print(json.dumps({**cpu_description(), "same": same}))
""", avx2_emulation_env())
    result = json.loads(out)
    assert result["cpu_class"] == "AVX2" and result["aten_capability"] == "AVX2"
    assert result["bf16_draft_projection_and_exact_argmax"] is False and result["same"] is True


@x86
def test_onednn_cap_below_amx_hides_amx():
    if not {"amx_tile", "avx512_bf16"} <= cpu_flags():
        pytest.skip("needs an AMX CPU")
    out = run("from hf_jetspec.cpu import cpu_class; print(cpu_class())", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert out == "AVX-512"


def test_bf16_autocast_measurement_follows_the_instruction_set():
    """bf16 autocast pays only with native bf16 instructions: capped at AVX2 it must measure slower than fp32."""
    script = "from hf_jetspec.cpu import bf16_autocast_speedup as s, cpu_class as c; print(c(), s(rows=256))"
    env = dict(os.environ, OMP_NUM_THREADS="1", **avx2_emulation_env())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cls, speedup = result.stdout.split()
    assert cls in ("AVX2", "other") and float(speedup) < 1.0


@pytest.mark.parametrize("speedup, bf16, generation_dtype", [(0.2, False, None), (3.0, True, "bfloat16")])
def test_training_dtype_auto_on_a_cpu_follows_the_measurement(monkeypatch, tmp_path, speedup, bf16, generation_dtype):
    import hf_jetspec.cpu
    from hf_jetspec_training import JetSpecTrainingConfig

    monkeypatch.setattr(hf_jetspec.cpu, "bf16_autocast_speedup", lambda *a, **k: speedup)
    config = JetSpecTrainingConfig(output_dir=str(tmp_path), use_cpu=True, generation_dtype="auto")
    assert config.bf16 is bf16 and config.generation_dtype == generation_dtype
    # set explicitly, it is kept whatever the measurement
    assert JetSpecTrainingConfig(output_dir=str(tmp_path), use_cpu=True, bf16=not bf16).bf16 is (not bf16)


@pytest.mark.parametrize("forced", ["1", "0"])
def test_greedy_output_is_exact_with_the_bf16_paths_and_transposed_products_on_and_off(forced):
    out = run("""
import json, torch, sys
sys.path.insert(0, "tests")
from conftest import make_tiny_target, oracle_for
from hf_jetspec.cpu import cpu_description
from hf_jetspec.exact_argmax import exact_argmax_for
for family in ("llama", "qwen3"):
    target = make_tiny_target(family, seed=3)
    prompt = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])
    expected = target.generate(prompt, do_sample=False, max_new_tokens=40)
    head = oracle_for(target, expected, rank_of_truth=1)
    out = target.generate(prompt, do_sample=False, max_new_tokens=40, assistant_model=head, tree_budget=16)
    assert out.tolist() == expected.tolist(), family
from hf_jetspec.packed_linear import packed_linears_for
from hf_jetspec.projection import measure_projection
print(json.dumps({**cpu_description(), "argmax": exact_argmax_for(target) is not None,
                  "transposed": sorted(getattr(packed_linears_for(target.model), "transposed_rows", ()))
                                + [i for i, on in enumerate(measure_projection(target).transposed) if on]}))
""", {"HF_JETSPEC_BF16_PATHS": forced, "HF_JETSPEC_TRANSPOSED_LINEARS": forced})
    result = json.loads(out)
    assert result["bf16_draft_projection_and_exact_argmax"] is (forced == "1") and result["argmax"] is (forced == "1")
    if forced == "0":  # the transposed products too (on, they run where timed faster: exactness in test_transposed_linear)
        assert result["transposed"] == []
