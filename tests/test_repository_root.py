"""Running from a checkout's root (`python -m pytest`, `python -c`) puts the root first on `sys.path`: no folder there
may shadow a library that transformers imports. `kernels/` (our Triton kernels, installed as `hf_jetspec_kernels`) did:
transformers 5.25 imports Hugging Face's `kernels` library at `import transformers` where it is installed, found the
checkout's `kernels/__init__.py` instead, and every test failed at collection with
`ImportError: cannot import name 'CUDAProperties' from 'kernels'`.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_root_kernels_folder_is_not_an_importable_kernels_package():
    # a namespace portion (no __init__.py) has no origin file; an installed library's lies elsewhere
    origin = _from_root("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)")
    assert origin in ("None", "namespace") or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin


def test_transformers_imports_from_the_root_with_hugging_faces_kernels_installed():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers >= 5.25 brings it)")
    out = _from_root("import kernels; from transformers import LlamaConfig; import hf_jetspec_kernels, hf_jetspec; "
                     "print(kernels.__file__); print(hf_jetspec_kernels.__file__)")
    library, ours = out.splitlines()[-2:]
    assert not Path(library).resolve().is_relative_to(ROOT / "kernels"), library
    assert Path(ours).resolve().is_relative_to(ROOT / "kernels" / "hf_jetspec_kernels"), ours
