"""Rewrite a head folder's config, tree settings and modeling code with this version of hf_jetspec (weights untouched).

Usage:
    python -m hf_jetspec_hub.refresh HEAD_DIR [HEAD_DIR ...]

Saved heads carry a copy of the modeling code (for `trust_remote_code=True`) and a config written by the library that
saved them; after the library changes, this brings the committed heads in `heads/` up to date. The weights are
loaded and compared, never rewritten.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from .publish import CODE_FILES

REFRESHED = ("config.json", "generation_config.json") + CODE_FILES


def refresh(head_dir: str | Path) -> list[str]:
    """Rewrites `REFRESHED` in `head_dir` from the loaded head; returns the names of the files whose bytes changed."""
    import torch
    from safetensors.torch import load_file

    from hf_jetspec import JetSpecHead

    head_dir = Path(head_dir)
    head = JetSpecHead.from_pretrained(head_dir)
    changed = []
    with tempfile.TemporaryDirectory() as tmp:
        head.save_pretrained(tmp)
        ours, theirs = load_file(str(head_dir / "model.safetensors")), load_file(str(Path(tmp) / "model.safetensors"))
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            raise RuntimeError(f"{head_dir}: the weights do not round-trip; not refreshing")
        for name in REFRESHED:
            new, old = Path(tmp) / name, head_dir / name
            if not old.exists() or old.read_bytes() != new.read_bytes():
                shutil.copyfile(new, old)
                changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head_dirs", nargs="+")
    for head_dir in parser.parse_args(argv).head_dirs:
        changed = refresh(head_dir)
        print(f"{head_dir}: {', '.join(changed) if changed else 'up to date'}")


if __name__ == "__main__":
    main()
