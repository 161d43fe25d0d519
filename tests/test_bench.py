"""`jetspec-bench` on a tiny target: records, equality checks, summary with confidence intervals, files, errors."""

import json

import pytest
import torch
from conftest import WORDS, make_tiny_target, save_tiny_target

from hf_jetspec import JetSpecHead
from hf_jetspec.bench import bootstrap_ci, load_eval_prompts, main, markdown_table, method_kwargs, summarize


def write_eval_sets(directory, count=3):
    directory.mkdir()
    generator = torch.Generator().manual_seed(3)
    for name in ("alpha", "spec_bench"):
        with (directory / f"{name}.jsonl").open("w") as handle:
            for index in range(count):
                words = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (5,), generator=generator))
                row = {"id": f"{name}/{index}", "prompt": words}
                if name == "spec_bench":
                    row["task"] = ["qa", "math_reasoning"][index % 2]
                handle.write(json.dumps(row) + "\n")


def test_eval_prompts_limit_and_spec_bench_categories(tmp_path):
    write_eval_sets(tmp_path / "eval", count=5)
    prompts = load_eval_prompts(tmp_path / "eval", ["alpha", "spec_bench"], limit=2)
    datasets = [p["dataset"] for p in prompts]
    assert datasets.count("alpha") == 2 and datasets.count("spec_bench/qa") == 2
    assert datasets.count("spec_bench/math_reasoning") == 2
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_eval_prompts(tmp_path / "eval", ["missing"], limit=1)
    (tmp_path / "eval" / "broken.jsonl").write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_eval_prompts(tmp_path / "eval", ["broken"], limit=5)


def test_method_names():
    head = type("Head", (), {"config": type("C", (), {"block_size": 6})()})()
    assert method_kwargs("chain", head) == {"assistant_model": head, "tree_budget": 6, "tree_topk": 1,
                                            "prompt_lookup_num_tokens": 0}  # what vLLM drafts
    assert method_kwargs("jetspec:12", head)["tree_budget"] == 12
    assert method_kwargs("jetspec:auto", head)["tree_budget"] == "auto"
    assert method_kwargs("jetspec:head", head) == {"assistant_model": head, "tree_budget": "auto",
                                                   "prompt_lookup_num_tokens": 0}
    for bad in ("jetspec:x", "jetspec:0", "medusa"):
        with pytest.raises(ValueError, match="method"):
            method_kwargs(bad, head)
    with pytest.raises(ValueError, match="--head"):
        method_kwargs("jetspec", None)
    with pytest.raises(ValueError, match="--draft-model"):
        method_kwargs("assisted", head)
    draft = object()
    assert method_kwargs("assisted", head, draft) == {"assistant_model": draft}


def test_bootstrap_interval_covers_the_statistic():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    low, high = bootstrap_ci(values, lambda s: sum(s) / len(s))
    assert low < 4.0 < high and low >= 1.0 and high <= 10.0


def test_benchmark_end_to_end_and_resume(tmp_path, capsys):
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    make_tiny_target("llama", seed=5, vocab_size=target.config.vocab_size, num_hidden_layers=1).save_pretrained(
        tmp_path / "draft")  # a smaller model with the same vocabulary, for Transformers' assisted generation
    write_eval_sets(tmp_path / "eval")
    methods = ["jetspec", "jetspec:3", "jetspec:6", "jetspec:auto", "chain", "prompt_lookup", "assisted"]
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--draft-model",
            str(tmp_path / "draft"), "--data-dir", str(tmp_path / "eval"), "--datasets", "alpha", "spec_bench",
            "--limit", "2", "--max-new-tokens", "12", "--methods", *methods, "--output-dir", str(tmp_path / "out")]
    results = main(argv)
    assert results["mismatches"] == 0
    records = results["records"]
    assert len(records) == 5 * 8  # 5 prompts (2 alpha; spec_bench: 2 qa, 1 math_reasoning) x 8 methods
    assert {r["method"] for r in records} == {"plain", *methods}
    chain = [r for r in records if r["method"] == "chain"]
    assert all(r["tree_topk"] == 1 and r["tree_budget"] == 4 for r in chain)
    assert all(r["tree_budget"] == 3 for r in records if r["method"] == "jetspec:3")
    assert all(r["tree_budget"] == "auto" and r["time_verify"] > 0 for r in records if r["method"] == "jetspec:auto")
    assert "tau" not in next(r for r in records if r["method"] == "assisted")
    rows = {(row["dataset"], row["method"]): row for row in results["summary"]}
    assert rows[("all", "plain")]["speedup"] == pytest.approx(1.0)
    jetspec = rows[("alpha", "jetspec")]
    assert jetspec["prompts"] == 2 and jetspec["tau_ci95"][0] <= jetspec["tau"] <= jetspec["tau_ci95"][1]
    assert "tau" not in rows[("alpha", "prompt_lookup")]
    assert set(rows[("all", "jetspec:auto")]["ms_per_round"]) == {"draft", "verify", "accept", "cache", "overhead"}
    assert 1 <= rows[("all", "jetspec:auto")]["tree_size"]
    out = tmp_path / "out"
    assert "| alpha | jetspec |" in (out / "results.md").read_text()
    for plot in ("speedup.png", "budget.png", "rounds.png"):
        assert (out / plot).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and len(saved["records"]) == 40

    # a second run with the same settings reuses every record (resume), and adds nothing
    before = (out / "records.jsonl").read_text()
    main(argv)
    assert (out / "records.jsonl").read_text() == before


def test_two_heads_side_by_side_in_one_run(tmp_path):
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    other = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6, layer_family="qwen3")
    other.save_pretrained(tmp_path / "heads" / "other-head")
    write_eval_sets(tmp_path / "eval")
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--compare-heads",
            str(tmp_path / "heads" / "other-head"), "--data-dir", str(tmp_path / "eval"), "--datasets", "alpha",
            "--limit", "2", "--max-new-tokens", "10", "--methods", "plain", "jetspec", "prompt_lookup",
            "--output-dir", str(tmp_path / "out")]
    results = main(argv)
    assert results["settings"]["methods"] == ["plain", "jetspec", "jetspec@other-head", "prompt_lookup"]
    assert results["mismatches"] == 0
    compared = [r for r in results["records"] if r["method"] == "jetspec@other-head"]
    assert len(compared) == 2 and all("tau" in r and r["tree_budget"] for r in compared)  # its own stats, not --head's
    row = next(r for r in results["summary"] if (r["dataset"], r["method"]) == ("alpha", "jetspec@other-head"))
    low, high = row["vs_jetspec_ci95"]
    assert low <= row["vs_jetspec"] <= high and "vs_prompt_lookup" in row
    assert "vs_jetspec" not in next(r for r in results["summary"] if r["method"] == "jetspec")
    assert "| alpha | jetspec@other-head |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="compare-heads"):
        method_kwargs("jetspec@missing", object(), other_heads={"other-head": object()})
    with pytest.raises(ValueError, match="--head"):
        main([a for a in argv if a not in ("--head", str(tmp_path / "head"))])


def test_summary_reports_a_mismatch():
    records = [
        {"dataset": "d", "id": "0", "method": "plain", "tokens": [1, 2], "new_tokens": 2, "seconds": 2.0},
        {"dataset": "d", "id": "0", "method": "jetspec", "tokens": [1, 3], "new_tokens": 2, "seconds": 1.0,
         "rounds": 1, "accepted_drafts": 1, "tau": 2.0},
    ]
    rows = {row["method"]: row for row in summarize(records, ["plain", "jetspec"]) if row["dataset"] == "d"}
    assert rows["jetspec"]["mismatches"] == 1 and rows["jetspec"]["speedup"] == pytest.approx(2.0)


def test_sampling_benchmark_seeds_every_method_alike(tmp_path):
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    write_eval_sets(tmp_path / "eval", count=2)
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--data-dir",
            str(tmp_path / "eval"), "--datasets", "alpha", "--limit", "2", "--max-new-tokens", "10",
            "--methods", "jetspec:4", "prompt_lookup", "--temperature", "1.0", "--output-dir", str(tmp_path / "out")]
    results = main(argv)
    assert results["settings"]["temperature"] == 1.0 and results["settings"]["greedy"] is False
    runs = {(r["id"], r["method"]): r["tokens"] for r in results["records"]}
    for prompt_id in ("alpha/0", "alpha/1"):  # seeded per prompt: JetSpec sampling gives plain sampling's tokens
        assert runs[(prompt_id, "jetspec:4")] == runs[(prompt_id, "plain")]
    assert runs[("alpha/0", "plain")] != runs[("alpha/1", "plain")]
    rows = {row["method"]: row for row in results["summary"] if row["dataset"] == "alpha"}
    assert rows["jetspec:4"]["mismatches"] == 0 and rows["prompt_lookup"]["mismatches"] is None


def test_speedup_is_a_throughput_ratio_for_outputs_of_different_lengths():
    records = [
        {"dataset": "d", "id": "0", "method": "plain", "tokens": [1] * 4, "new_tokens": 4, "seconds": 2.0},
        {"dataset": "d", "id": "0", "method": "prompt_lookup", "tokens": [1] * 8, "new_tokens": 8, "seconds": 2.0},
    ]
    rows = {row["method"]: row for row in summarize(records, ["plain", "prompt_lookup"], greedy=False)
            if row["dataset"] == "d"}
    assert rows["prompt_lookup"]["speedup"] == pytest.approx(2.0) and rows["prompt_lookup"]["mismatches"] is None


def test_jetspec_is_compared_with_prompt_lookup_prompt_by_prompt():
    records = []
    for index, (plain_s, lookup_s, jetspec_s) in enumerate([(4.0, 2.0, 1.0), (4.0, 4.0, 2.0)]):
        for method, seconds in (("plain", plain_s), ("prompt_lookup", lookup_s), ("jetspec", jetspec_s)):
            records.append({"dataset": "d", "id": str(index), "method": method, "tokens": [1, 2], "new_tokens": 2,
                            "seconds": seconds, **({"rounds": 1, "accepted_drafts": 1, "tau": 2.0}
                                                   if method == "jetspec" else {})})
    rows = summarize(records, ["plain", "prompt_lookup", "jetspec"])
    jetspec = next(row for row in rows if row["dataset"] == "d" and row["method"] == "jetspec")
    assert jetspec["vs_prompt_lookup"] == pytest.approx(2.0)  # 6 s of prompt lookup against 3 s
    low, high = jetspec["vs_prompt_lookup_ci95"]
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert all("vs_prompt_lookup" not in row for row in rows if row["method"] != "jetspec")
    table = markdown_table(rows)
    assert "vs prompt lookup (95% CI)" in table and "| 2.00x (2.00-2.00) |" in table


def test_benchmark_loads_the_target_with_the_requested_device_dtype_and_attention(tmp_path):
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")  # fp32
    write_eval_sets(tmp_path / "eval", count=2)
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--data-dir",
            str(tmp_path / "eval"), "--datasets", "alpha", "--limit", "2", "--max-new-tokens", "8",
            "--methods", "jetspec:4", "--device", "cpu", "--dtype", "bfloat16", "--attn-implementation", "eager",
            "--output-dir", str(tmp_path / "out")]
    results = main(argv)
    environment = results["environment"]
    assert environment["dtype"] == "torch.bfloat16" and environment["attn_implementation"] == "eager"
    assert environment["device"] == "cpu" and results["mismatches"] == 0


def test_a_benchmark_runs_the_datasets_round_robin_and_resumes_with_a_larger_limit(tmp_path):
    """A part run covers every dataset alike, and a rerun with a larger `--limit` keeps the runs already made (a
    prompt's run does not depend on the limit): only the new prompts run."""
    from hf_jetspec.bench import interleaved

    rows = [{"dataset": d, "id": f"{d}{i}"} for d, n in (("a", 3), ("b", 1), ("c", 2)) for i in range(n)]
    assert [row["id"] for row in interleaved(rows)] == ["a0", "b0", "c0", "a1", "c1", "a2"]
    target, _ = save_tiny_target(tmp_path / "target")
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    write_eval_sets(tmp_path / "eval", count=4)
    argv = ["--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--data-dir",
            str(tmp_path / "eval"), "--datasets", "alpha", "spec_bench", "--max-new-tokens", "6",
            "--methods", "jetspec:4", "--output-dir", str(tmp_path / "out")]
    first = main(argv + ["--limit", "1"])
    assert len(first["records"]) == 3 * 2  # alpha, spec_bench/qa, spec_bench/math_reasoning x (plain, jetspec:4)
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    second = main(argv + ["--limit", "2"])
    after = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert after[: len(lines)] == lines and len(after) == 2 * len(lines)  # the first run's records kept, 3 prompts more
    assert len(second["records"]) == 12 and second["mismatches"] == 0
    assert [json.loads(line)["dataset"] for line in after[len(lines)::2]] == ["alpha", "spec_bench/qa",
                                                                             "spec_bench/math_reasoning"]
    assert len(main(argv + ["--limit", "1"])["records"]) == 6  # a smaller limit summarises its own prompts only
