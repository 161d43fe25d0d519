"""Recipes, corpora and training prompts ship inside hf_jetspec_training: a recipe's checkout paths fall back to the
packaged copies, so `jetspec-train --config <recipe>` runs from a pip install (here: from another directory)."""

import json
from pathlib import Path

import pytest

from hf_jetspec_training import load_prompts
from hf_jetspec_training.resources import PACKAGE_DIR, resolve_corpus, resolve_prompt_file, resolve_recipe

SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
RECIPES = sorted((PACKAGE_DIR / "recipes").glob("*.yaml"))


def test_every_recipe_resolves_its_files_from_another_directory(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # no checkout here, no ../shared
    assert RECIPES
    for recipe in RECIPES:
        assert resolve_recipe(recipe.stem) == recipe and resolve_recipe(f"training/recipes/{recipe.name}") == recipe
        config = yaml.safe_load(recipe.read_text())
        for path in config.get("train_files", []):
            assert resolve_prompt_file(path).is_file(), (recipe.name, path)
        if config.get("corpus"):
            assert (resolve_corpus(config["corpus"]) / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="packaged"):
        resolve_recipe("no-such-recipe")
    with pytest.raises(FileNotFoundError, match="packaged"):
        resolve_prompt_file("../shared/data/train/no_such_prompts.jsonl")


def test_packaged_prompts_read_as_the_source_files_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = load_prompts(["../shared/data/train/mbpp_train.jsonl", "chat_self_instruct.jsonl"])
    rows = packaged.rows
    ids = [row["id"] for row in rows]
    assert packaged.skipped["near_eval_variant"] == 2  # never trained on
    assert len(ids) == 251 + 427 and len(set(ids)) == len(ids)
    assert {row["source"] for row in rows} == {"mbpp_train", "chat_self_instruct"}
    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"{SHARED_TRAIN} (the source files) is not on this machine")
    source = load_prompts([SHARED_TRAIN / "mbpp_train.jsonl", SHARED_TRAIN / "chat_self_instruct.jsonl"])
    source_rows = source.rows
    assert [(r["id"], r["prompt"], r["source"]) for r in source_rows] == [
        (r["id"], r["prompt"], r["source"]) for r in rows]


def test_the_packaged_prompts_readme_lists_every_file():
    readme = (PACKAGE_DIR / "prompts" / "README.md").read_text()
    for path in (PACKAGE_DIR / "prompts").glob("*.jsonl.gz"):
        assert f"`{path.name}`" in readme
