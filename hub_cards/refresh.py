"""Rewrite a head folder's config, tree settings and modeling code with this version of hf_jetspec (weights untouched).

Usage:
    python -m hf_jetspec_hub.refresh HEAD_DIR [HEAD_DIR ...]

Saved heads carry the modeling code (for `trust_remote_code=True`) and a config written by the library that saved
them; this brings the committed heads in `heads/` up to date after the library changes: the config rewritten, the
code files linked to hf_jetspec's own. The weights are loaded and compared, never rewritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .publish import CODE_FILES

REFRESHED = ("config.json", "generation_config.json") + CODE_FILES


def refresh(head_dir: str | Path, link_code: bool = True) -> list[str]:
    """Rewrites `REFRESHED` in `head_dir` from the loaded head; returns the names of the files that changed.

    With `link_code` the modeling code files become relative symlinks to hf_jetspec's own (the heads committed in
    this repository: one copy of the code, never stale; `jetspec-publish` uploads real files). Without it they are
    copies, as `save_pretrained` writes them.
    """
    import torch
    from safetensors.torch import load_file

    import hf_jetspec
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
            if name in CODE_FILES and link_code:  # the library's own file, linked: one copy of the code in the repo
                source = Path(hf_jetspec.__file__).parent / name
                if not old.is_symlink() or old.resolve() != source.resolve():
                    old.unlink(missing_ok=True)
                    old.symlink_to(os.path.relpath(source, head_dir))
                    changed.append(name)
            elif not old.exists() or old.is_symlink() or old.read_bytes() != new.read_bytes():
                old.unlink(missing_ok=True)
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
