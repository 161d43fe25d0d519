"""The eval prompt sets and the committed corpus ship with the package, so benchmarks and recipes run from a pip
install: files present as package data, unchanged (sha256 as listed in the shipped README), and used by default."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from hf_jetspec.bench import DEFAULT_EVAL_DIR, load_eval_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_eval_sets_ship_unchanged_with_their_sources():
    readme = (DEFAULT_EVAL_DIR / "README.md").read_text()
    listed = dict(re.findall(r"\| `([a-z0-9_]+\.jsonl)` \| \d+ \| .+? \| ([0-9a-f]{64}) \|", readme))
    assert set(listed) == {p.name for p in DEFAULT_EVAL_DIR.glob("*.jsonl")} and len(listed) == 6
    for name, digest in listed.items():
        assert hashlib.sha256((DEFAULT_EVAL_DIR / name).read_bytes()).hexdigest() == digest, name
    assert DEFAULT_EVAL_DIR.is_relative_to(ROOT / "hf_jetspec")  # not ../shared, which a pip install lacks
    prompts = load_eval_prompts(DEFAULT_EVAL_DIR, ["gsm8k_test", "mt_bench"], limit=50)
    assert len(prompts) == 100


def test_package_data_globs_cover_the_shipped_files():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data, dirs = config["package-data"], config["package-dir"]
    def covered(package, path):
        base = ROOT / dirs.get(package, package)
        return any(path in base.glob(pattern) for pattern in data.get(package, []))
    for path in DEFAULT_EVAL_DIR.iterdir():
        assert covered("hf_jetspec", path), path
    corpus = ROOT / "training" / "corpora" / "smollm2-135m-instruct"
    for path in [corpus / "README.md", *sorted((corpus / "data").iterdir())]:
        assert covered("hf_jetspec_training", path), path
