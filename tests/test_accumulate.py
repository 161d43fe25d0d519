"""Training that accumulates: a run continues a saved head (optimizer, schedule, steps, CPU-hours), on the committed
on-policy corpus (parquet, loaded with `datasets`), whose prompts never come near an eval prompt."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_target, tiny_tokenizer
from test_training import short_run_config, tiny_run_inputs

from hf_jetspec import JetSpecHead
from hf_jetspec.chat import chat_input_ids
from hf_jetspec_training.corpus import (
    NgramOverlap,
    _seed_caches_from,
    eval_prompts,
    follow_up_rows,
    load_corpus,
    pick_validation,
    recover_prompt,
    self_instruct_prompts,
    write_corpus,
)
from hf_jetspec_training.data import read_cache
from hf_jetspec_training.train import train


def test_continuing_a_saved_head_picks_up_its_steps_schedule_and_optimizer(tmp_path):
    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=13, count=8)
    first = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run1"), max_steps=6, logging_steps=1,
                             lr_scheduler_type="linear", warmup_steps=0)
    trainer, head_dir = train(first, target=target, tokenizer=tokenizer)
    state = json.loads((head_dir / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    saved_optimizer = torch.load(head_dir / "training_state" / "optimizer.pt", weights_only=False)

    more = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run2"), head_init=str(head_dir),
                            continue_training=True, more_steps=4, logging_steps=1, lr_scheduler_type="linear",
                            warmup_steps=0)
    trainer, final_dir = train(more, target=target, tokenizer=tokenizer)
    assert trainer.state.global_step == 10
    optimizer = trainer.optimizer.state_dict()
    first_param = next(iter(optimizer["state"]))
    # AdamW's per-parameter step counts carried on: 6 saved + 4 more
    assert float(saved_optimizer["state"][first_param]["step"]) == 6
    assert float(optimizer["state"][first_param]["step"]) == 10
    # the linear schedule continued over 10 steps: the step-7 learning rate is 3e-3 x (10 - 6) / 10
    # (not the old schedule's final 0, and not a restart at 3e-3)
    lrs = {log["step"]: log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log}
    assert lrs[7] == pytest.approx(3e-3 * (10 - 6) / 10, rel=1e-6)
    recipe = JetSpecHead.from_pretrained(final_dir).config.training_recipe
    assert [run["steps"] for run in recipe["runs"]] == [[0, 6], [6, 10]]
    assert recipe["total_cpu_hours"] == pytest.approx(sum(run["cpu_hours"] for run in recipe["runs"]))
    assert all(run["train_minutes"] >= 0 for run in recipe["runs"])

    # a warm restart: the step count and AdamW state go on, the rate starts its own decay over the 4 new steps from
    # this run's learning_rate
    restart = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run4"), head_init=str(head_dir),
                               continue_training=True, more_steps=4, restart_schedule=True, learning_rate=1e-3,
                               logging_steps=1, lr_scheduler_type="linear", warmup_steps=0)
    trainer, _ = train(restart, target=target, tokenizer=tokenizer)
    assert trainer.state.global_step == 10
    assert float(trainer.optimizer.state_dict()["state"][first_param]["step"]) == 10
    lrs = {log["step"]: log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log}
    assert [lrs[step] for step in (7, 8, 9, 10)] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3], rel=1e-6)
    with pytest.raises(ValueError, match="restart_schedule"):
        short_run_config(tmp_path, prompts, head_init=str(head_dir), restart_schedule=True)

    # a continued run logs and saves at ITS intervals, not the saved head's (transformers restores those with the
    # checkpoint: logging every step, saving every 100, as the first run had)
    other = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run5"), head_init=str(head_dir),
                             continue_training=True, more_steps=4, logging_steps=2, save_steps=3,
                             save_total_limit=None)
    trainer, _ = train(other, target=target, tokenizer=tokenizer)
    assert sorted(log["step"] for log in trainer.state.log_history if "loss" in log and log["step"] > 6) == [8, 10]
    saved = {path.name for path in (tmp_path / "run5").glob("checkpoint-*")}
    assert "checkpoint-9" in saved and not saved & {"checkpoint-7", "checkpoint-8"}

    with pytest.raises(ValueError, match="more_steps"):
        train(short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run3"), head_init=str(final_dir),
                               continue_training=True, max_steps=5), target=target, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="head_init"):
        short_run_config(tmp_path, prompts, continue_training=True)


def test_corpus_round_trips_through_datasets_and_trains(tmp_path):
    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=14, vocab_size=len(tokenizer))
    rows = [{"id": f"r{i}", "source": "gsm8k_train" if i % 2 else "chat_self_instruct", "turn": 1,
             "input_ids": list(range(3, 3 + 8 + i)), "prompt_length": 5} for i in range(10)]
    folder = write_corpus(rows, tmp_path / "corpus", {"target": "tiny", "target_lines": "- tiny", "max_new_tokens": 8,
                                                      "near_eval": 0, "self_instruct_dropped": "none", "how": "test"},
                          shard_rows=4)
    assert len(list((folder / "data").glob("train-*.parquet"))) == 3
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "data/train-*.parquet" in card and "| gsm8k_train (turn 1) | 5 |" in card
    corpus = load_corpus(folder)
    assert len(corpus) == 10 and corpus[0]["input_ids"] == list(range(3, 11)) and corpus[0]["prompt_length"] == 5
    with pytest.raises(FileNotFoundError, match="no corpus shards"):
        load_corpus(tmp_path / "empty")
    # rewritten under the same shard names: the new rows, not datasets' cache of the old ones
    write_corpus(rows + [{**rows[0], "id": "r10"}], folder, {"target": "tiny", "target_lines": "- tiny",
                 "max_new_tokens": 8, "near_eval": 0, "self_instruct_dropped": "none", "how": "test"}, shard_rows=4)
    assert len(load_corpus(folder)) == 11
    write_corpus(rows, folder, {"target": "tiny", "target_lines": "- tiny", "max_new_tokens": 8, "near_eval": 0,
                                "self_instruct_dropped": "none", "how": "test"}, shard_rows=4)

    config = short_run_config(tmp_path, tmp_path / "unused.jsonl", train_files=[], corpus=str(folder), max_steps=2,
                              tau_eval_steps=2, tau_eval_prompts=2, tau_eval_max_new_tokens=4)
    trainer, final_dir = train(config, target=target, tokenizer=tokenizer)
    assert len(trainer.train_dataset) == 8  # 2 first turns held out for tau
    recipe = JetSpecHead.from_pretrained(final_dir).config.training_recipe
    assert recipe["corpus"] == "corpus" and recipe["validation"] is None
    assert load_corpus(folder, split="validation") is None


def test_a_corpus_validation_split_is_never_trained_on_and_measures_the_head(tmp_path):
    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=15, vocab_size=len(tokenizer))
    rows = [{"id": f"r{i}", "source": "gsm8k_train" if i % 2 else "chat_self_instruct", "turn": 1,
             "input_ids": [4 + (i * 7 + j) % 20 for j in range(14 + i)], "prompt_length": 5} for i in range(12)]
    rows.append({**rows[0], "id": "r0#turn2", "turn": 2})
    card = {"target": "tiny", "target_lines": "- tiny", "max_new_tokens": 8, "near_eval": 0,
            "self_instruct_dropped": "none", "how": "test"}
    # r0 is followed by a second turn and r1..r3 are rows earlier heads trained on: neither can be held out
    held = pick_validation(rows, 3, already=set(), exclude={"r1", "r2", "r3"}, seed=0)
    assert len(held) == 3 and not held & {"r0", "r1", "r2", "r3", "r0#turn2"}
    assert pick_validation(rows, 4, already=held, exclude=set(), seed=1) > held  # an earlier split is kept
    with pytest.raises(ValueError, match="only 8 new first-turn rows"):
        pick_validation(rows, 9, already=set(), exclude={"r1", "r2", "r3"})
    folder = write_corpus(rows, tmp_path / "corpus", card, validation_ids=held)
    text = (folder / "README.md").read_text()
    assert "- split: validation\n    path: data/validation-*.parquet" in text and "Split `validation`: 3" in text
    assert {row["id"] for row in load_corpus(folder, split="validation")} == held
    assert not held & {row["id"] for row in load_corpus(folder)} and len(load_corpus(folder)) == 10
    from datasets import load_dataset

    assert len(load_dataset(str(folder), split="validation")) == 3  # the card's configs name the split for datasets

    config = short_run_config(tmp_path, tmp_path / "unused.jsonl", train_files=[], corpus=str(folder), max_steps=2,
                              eval_strategy="steps", eval_steps=1, logging_steps=1)
    trainer, final_dir = train(config, target=target, tokenizer=tokenizer)
    assert len(trainer.train_dataset) == 10 and len(trainer.eval_dataset) == 3
    measured = JetSpecHead.from_pretrained(final_dir).config.training_recipe["validation"]
    assert measured["sequences"] == 3 and 0.0 <= measured["top1_depth1"] <= 1.0 and measured["expected_chain_tau"] >= 1
    curve = json.loads((Path(config.output_dir) / "training_curve.json").read_text())
    assert [point["step"] for point in curve["eval_top1_depth1"]][:2] == [1, 2]

    # eval_only: the saved head on the validation rows and on as many training rows, nothing trained or saved
    config = short_run_config(tmp_path, tmp_path / "unused.jsonl", train_files=[], corpus=str(folder),
                              head_init=str(final_dir), eval_only=True, output_dir=str(tmp_path / "eval"))
    trainer, nothing = train(config, target=target, tokenizer=tokenizer)
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert nothing is None and trainer.state.global_step == 0 and not list((tmp_path / "eval").glob("checkpoint-*"))
    assert results["validation"]["sequences"] == results["train"]["sequences"] == 3
    assert results["validation"]["top1_depth1"] == measured["top1_depth1"]  # same head, rows and anchors as in training
    with pytest.raises(ValueError, match="has no validation split"):
        train(short_run_config(tmp_path, tmp_path / "unused.jsonl", train_files=[], corpus=str(_corpus_without_validation(tmp_path, rows)),
                               head_init=str(final_dir), eval_only=True), target=target, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`eval_only` measures `head_init`"):
        short_run_config(tmp_path, tmp_path / "unused.jsonl", eval_only=True)


def _corpus_without_validation(tmp_path, rows):
    return write_corpus(rows, tmp_path / "no-validation", {"target": "tiny", "target_lines": "- tiny",
                        "max_new_tokens": 8, "near_eval": 0, "self_instruct_dropped": "none", "how": "test"})


def test_overlap_check_rejects_a_planted_near_duplicate_of_an_eval_prompt(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({
        "id": "g1", "prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                              "in May. How many clips did Natalia sell altogether in April and May?"}) + "\n")
    (tmp_path / "mt_bench.jsonl").write_text(json.dumps({"id": "m1", "prompt": "Hi", "turns": [
        "Compose an engaging travel blog post about a recent trip to Hawaii.", "Rewrite it starting every sentence with A."]}) + "\n")
    check = NgramOverlap(eval_prompts(tmp_path))
    # reworded names and numbers, most of the text kept
    assert check.near("Maria sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                      "How many clips did she sell?")
    assert check.near("compose an engaging travel blog post about a recent trip to hawaii")  # a second-turn source
    assert check.near("Hi")  # a short eval prompt, word for word
    assert not check.near("Write a short poem about autumn leaves falling in a quiet park.")
    assert not check.near("How many clips are in a box?")


def test_follow_up_rows_continue_the_targets_own_answer():
    tokenizer = tiny_tokenizer()
    first = [{"id": "c1", "prompt": "tell me", "input_ids": [5, 6, 7, 8, 9], "prompt_length": 3, "source": "chat"}]
    (row,) = follow_up_rows(first, tokenizer)
    assert row["id"] == "c1#turn2" and row["turn"] == 2
    roles = [message["role"] for message in row["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert row["messages"][1]["content"] == tokenizer.decode([8, 9], skip_special_tokens=True).strip()


def test_a_continued_runs_wall_clock_budget_is_its_own():
    """`max_train_minutes` of a run continuing a saved head counts that run's minutes, not the head's earlier ones
    (checked by breaking it: without `run_start_minutes` a head with 192 recorded minutes stopped after one step)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from hf_jetspec_training.trainer import _TrainClock

    trainer = SimpleNamespace(_clock=None, run_start_minutes=0.0)
    clock = _TrainClock(trainer)
    state = TrainerState()
    state.log_history = [{"step": 2251, "train_minutes": 192.2}]  # the saved head's cumulative minutes
    args = SimpleNamespace(max_train_minutes=58, device="cpu")
    for run_start, stops in ((192.2, False), (0.0, True)):  # a continued run / the same head resumed as one run
        trainer.run_start_minutes = run_start
        control = TrainerControl()
        clock.on_train_begin(args, state, control)
        clock.on_step_end(args, state, control)
        assert control.should_training_stop is stops


def test_extending_a_corpus_keeps_its_rows_and_recovers_its_prompts(tmp_path):
    """`corpus --extend`: the rows already there seed the response caches (never written again), every first turn's
    prompt comes back from its ids, and new self-instruct prompts continue the ids without repeating old ones."""
    tokenizer = tiny_tokenizer()
    prompts = {"self_instruct_target/0": "the cat sat on the mat", "self_instruct_target/1": "a dog ran under a log",
               "gsm8k_train-3": "one two three four five"}
    rows = []
    for row_id, text in prompts.items():
        ids = chat_input_ids(tokenizer, text)[0].tolist()
        assert recover_prompt(tokenizer, ids + [5, 6], len(ids)) == text
        rows.append({"id": row_id, "source": row_id.split("/")[0].split("-")[0], "turn": 1,
                     "input_ids": ids + [5, 6, 1], "prompt_length": len(ids)})
    rows[2]["source"] = "gsm8k_train"
    turn2_ids = tokenizer.apply_chat_template([{"role": "user", "content": "the cat sat on the mat"},
                                               {"role": "assistant", "content": "red"},
                                               {"role": "user", "content": "big"}], add_generation_prompt=True)
    turn2_ids = turn2_ids["input_ids"] if hasattr(turn2_ids, "keys") else turn2_ids
    rows.append({"id": "self_instruct_target/0#turn2", "source": "self_instruct_target", "turn": 2,
                 "input_ids": list(turn2_ids) + [7, 1], "prompt_length": len(turn2_ids)})
    folder = write_corpus(rows, tmp_path / "corpus", {"target": "tiny", "target_lines": "- tiny", "max_new_tokens": 8,
                                                      "near_eval": 0, "self_instruct_dropped": "none", "how": "first run"},
                          validation_ids={"gsm8k_train-3"})
    assert recover_prompt(tokenizer, [0] + rows[0]["input_ids"], rows[0]["prompt_length"] + 1) is None  # not its template

    work = tmp_path / "work"
    work.mkdir()
    kept = _seed_caches_from(folder, work, tokenizer)
    earlier, how, ids, held, dropped = kept
    assert how == "first run" and ids == {row["id"] for row in rows} and held == {"gsm8k_train-3"}
    assert dropped == "none" and kept.runs == 1
    assert {row["id"]: row["prompt"] for row in earlier} == prompts
    turn1, turn2 = read_cache(work / "turn1.jsonl"), read_cache(work / "turn2.jsonl")
    assert set(turn1) == set(prompts) and set(turn2) == {"self_instruct_target/0#turn2"}
    assert turn1["gsm8k_train-3"]["input_ids"] == rows[2]["input_ids"]
    _seed_caches_from(folder, work, tokenizer)  # a second call adds nothing twice
    assert len((work / "turn1.jsonl").read_text().splitlines()) == 3

    class Writer:  # the target's sampled continuation of the seed list: one old prompt, then two new ones
        device = torch.device("cpu")
        lines = iter(["the cat sat on the mat", "red blue one two", "six five four three"])

        def generate(self, input_ids, **kwargs):
            new = [tokenizer(next(self.lines), add_special_tokens=False)["input_ids"] for _ in input_ids]
            width = max(map(len, new))
            return torch.cat([input_ids, torch.tensor([row + [1] * (width - len(row)) for row in new])], 1)

    existing = [row for row in earlier if row["source"] == "self_instruct_target"]
    seeds = ["big red dog ran", "small blue cat sat", "the mat and the log", "one cat or two dogs"]
    kept, dropped = self_instruct_prompts(Writer(), tokenizer, seeds, 4, batch_size=1, existing=existing)
    assert [row["id"] for row in kept] == [f"self_instruct_target/{i}" for i in range(4)]
    assert [row["prompt"] for row in kept[2:]] == ["red blue one two", "six five four three"]
    assert dropped["duplicate"] == 1
    assert self_instruct_prompts(Writer(), tokenizer, seeds, 2, existing=existing)[0] == existing  # nothing to add


@pytest.mark.parametrize("speedup, written_in", [(0.04, "float32"), (3.0, "bfloat16")])
def test_corpus_writes_in_bf16_only_where_bf16_measures_faster(monkeypatch, tmp_path, speedup, written_in):
    """`jetspec-corpus --generation-dtype auto` (the default): a bf16 copy of the target writes the responses only on a
    CPU where bf16 measures faster (AMX, AVX-512 BF16); on an AVX2 CPU it writes several times slower, so the target as loaded
    (fp32) writes them. The card's command names the dtype the rows were written in."""
    import hf_jetspec
    import hf_jetspec.cpu
    from hf_jetspec_training import corpus

    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=21, vocab_size=len(tokenizer))
    dtypes = []
    real_generate = type(target).generate

    def generate(self, *args, **kwargs):
        dtypes.append(self.dtype)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "generate", generate)
    monkeypatch.setattr(hf_jetspec, "load_default_target", lambda *a, **k: (target, tokenizer))
    monkeypatch.setattr(hf_jetspec.cpu, "bf16_autocast_speedup", lambda *a, **k: speedup)
    train = tmp_path / "train"
    train.mkdir()
    texts = ["the cat sat on the mat", "a dog ran under a log", "one two three four five", "red big cat ran"]
    for i, name in enumerate(("gsm8k_train", "chat_self_instruct", "math_train", "mbpp_train")):
        (train / f"{name}.jsonl").write_text(json.dumps({"id": f"{name}/{i}", "prompt": texts[i]}) + "\n")
    out = tmp_path / "corpus"
    corpus.main(["--out", str(out), "--work", str(tmp_path / "work"), "--train-dir", str(train), "--limits", "1", "1",
                 "1", "1", "--self-instruct", "0", "--second-turns", "0", "--max-new-tokens", "3", "--batch-size", "4",
                 "--device", "cpu"])
    assert dtypes and set(dtypes) == {getattr(torch, written_in)}
    assert f"--generation-dtype {written_in} --seed 0" in (out / "README.md").read_text()
    assert len(load_corpus(out)) == 4
    # extended: the card keeps each run's command and self-instruct drop counts
    texts = ["one red cat sat", "two big dogs ran", "a log under the mat", "five cats on a log"]
    for i, name in enumerate(("gsm8k_train", "chat_self_instruct", "math_train", "mbpp_train")):
        with (train / f"{name}.jsonl").open("a") as handle:
            handle.write(json.dumps({"id": f"{name}/{i + 10}", "prompt": texts[i]}) + "\n")
    corpus.main(["--out", str(out), "--work", str(tmp_path / "work"), "--train-dir", str(train), "--limits", "2", "2",
                 "2", "2", "--self-instruct", "0", "--second-turns", "0", "--max-new-tokens", "3", "--batch-size", "4",
                 "--device", "cpu", "--extend"])
    card = (out / "README.md").read_text()
    assert len(load_corpus(out)) == 8 and card.count(f"--generation-dtype {written_in}") == 2
    assert ("dropped: length 0, duplicate 0, near_eval 0 (first run); length 0, duplicate 0, near_eval 0 "
            "(extension 1).") in " ".join(card.split())
