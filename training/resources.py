"""What ships inside `hf_jetspec_training`, so recipes run from a pip install: the recipes (`recipes/*.yaml`), the
on-policy corpora (`corpora/<name>/`) and the training prompts (`prompts/<name>.jsonl.gz`, see `prompts/README.md`).

A recipe names them as paths in a checkout (`training/corpora/...`, `../shared/data/train/...`); where such a path does
not exist (a pip install, another working directory), the packaged copy of the same name is used instead.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _packaged(kind: str, name: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        candidate = PACKAGE_DIR / kind / (name + suffix)
        if candidate.exists():
            return candidate
    return None


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: `path` as given, else the packaged recipe of that name (`smollm2-135m-cpu-qwen3` or
    `training/recipes/smollm2-135m-cpu-qwen3.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    found = _packaged("recipes", path.name.removesuffix(".yaml"), (".yaml",))
    if found is None:
        names = sorted(p.stem for p in (PACKAGE_DIR / "recipes").glob("*.yaml"))
        raise FileNotFoundError(f"No recipe {str(path)!r} here or in hf_jetspec_training (packaged: {names})")
    return found


def resolve_corpus(path: str | Path) -> Path:
    """A corpus folder: `path` as given, else the packaged corpus of that name."""
    path = Path(path)
    if path.is_dir():
        return path
    found = _packaged("corpora", path.name, ("",))
    if found is None:
        names = sorted(p.name for p in (PACKAGE_DIR / "corpora").iterdir() if p.is_dir())
        raise FileNotFoundError(f"No corpus folder {str(path)!r} here or in hf_jetspec_training (packaged: {names})")
    return found


def resolve_prompt_file(path: str | Path) -> Path:
    """A prompt file: `path` as given, else the packaged prompts of that name (`gsm8k_train.jsonl` or
    `../shared/data/train/gsm8k_train.jsonl` -> `prompts/gsm8k_train.jsonl.gz`)."""
    path = Path(path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    found = _packaged("prompts", stem, (".jsonl.gz",))
    if found is None:
        names = sorted(p.name.removesuffix(".jsonl.gz") for p in (PACKAGE_DIR / "prompts").glob("*.jsonl.gz"))
        raise FileNotFoundError(f"prompt file {path} does not exist, and hf_jetspec_training packages no prompts of "
                                f"that name (packaged: {names})")
    return found
