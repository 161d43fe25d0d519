"""`jetspec-bench-batch` on a tiny target: throughput rows per batch size, equality with plain, files, fallbacks."""

import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import WORDS, save_tiny_target

from hf_jetspec import JetSpecHead
from hf_jetspec.bench_batch import FALLBACK_PROMPTS, generated_tokens, left_pad, load_prompts, main


def write_eval_set(directory, name, count):
    directory.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(len(name))
    with (directory / f"{name}.jsonl").open("w") as handle:
        for index in range(count):
            length = 2 + index % 5  # prompts of different lengths: batches get left padding
            words = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=generator))
            handle.write(json.dumps({"id": f"{name}/{index}", "prompt": words}) + "\n")


def test_prompts_round_robin_and_fallback(tmp_path):
    write_eval_set(tmp_path / "eval", "alpha", 2)
    write_eval_set(tmp_path / "eval", "beta", 3)
    prompts, source = load_prompts(tmp_path / "eval", None, 7)
    alpha = (tmp_path / "eval" / "alpha.jsonl").read_text().splitlines()
    assert source == str(tmp_path / "eval") and len(prompts) == 7
    assert prompts[0] == json.loads(alpha[0])["prompt"] and prompts[4] == prompts[0]  # alpha cycles after 2
    assert load_prompts(tmp_path / "missing", None, 3) == (list(FALLBACK_PROMPTS[:3]), "fallback")
    with pytest.raises(FileNotFoundError, match="--datasets"):
        load_prompts(tmp_path / "eval", ["gamma"], 3)


def test_left_pad_and_generated_tokens():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0, device="cpu")
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    output = torch.tensor([[5, 6, 7, 3, 1, 0], [0, 0, 8, 4, 4, 4]])
    assert generated_tokens(output, 3, {1}) == [[3, 1], [4, 4, 4]]


@pytest.mark.parametrize("with_eval_sets", [True, False])
def test_benchmark_end_to_end(tmp_path, with_eval_sets, capsys):
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    if with_eval_sets:
        write_eval_set(tmp_path / "eval", "alpha", 4)
        write_eval_set(tmp_path / "eval", "beta", 4)
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--batch-sizes", "1", "2", "4",
            "--num-prompts", "4", "--max-new-tokens", "6", "--data-dir", str(tmp_path / "eval"),
            "--out", str(tmp_path / "out")]
    results = main(argv)
    assert results["mismatches"] == 0
    assert results["settings"]["prompts"] == (str(tmp_path / "eval") if with_eval_sets else "fallback")
    rows = {row["batch_size"]: row for row in results["summary"]}
    assert set(rows) == {1, 2, 4}
    for size, row in rows.items():
        assert row["plain_tokens_per_s"] > 0 and row["jetspec_tokens_per_s"] > 0 and row["mismatches"] == 0
        assert row["plain_new_tokens"] == row["jetspec_new_tokens"] > 0
        runs = [r for r in results["records"] if r["batch_size"] == size]
        assert len(runs) == 2 * (4 // size) and {r["rows"] for r in runs} == {size}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"] == results["summary"] and saved["environment"]["torch"] == torch.__version__
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 0
    assert "batch   4:" in capsys.readouterr().out


def test_console_entry_point():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["jetspec-bench-batch"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
