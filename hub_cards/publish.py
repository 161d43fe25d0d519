"""Prepare a head repo folder (weights + config + tree settings + card) and publish it to the Hub.

Usage:
    jetspec-publish HEAD_DIR --repo-id org/name [--results results.json] --dry-run OUT_DIR   # write what would go up
    jetspec-publish HEAD_DIR --repo-id org/name [--results results.json] [--private] [--revision BRANCH]
                    [--commit-message MSG] [--create-pr] [--token TOKEN]                    # create repo + upload

The repo holds the weights, config (with `auto_map`), tree settings, card and the head's modeling code, so
`AutoModel.from_pretrained(repo, trust_remote_code=True)` loads the head where hf_jetspec is not installed.

`--results` is a `jetspec-bench` results.json (its JetSpec rows go on the card), or a list of rows
{"dataset", "prompts", "max_new_tokens", "tau", "speedup", "hardware", "settings"}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from .card import render_card, rows_from_benchmark, validate_card_metadata

# the modeling code `save_pretrained` copies for `trust_remote_code` (modeling_jetspec.py and its relative imports)
CODE_FILES = ("configuration_jetspec.py", "masks.py", "modeling_jetspec.py", "target_logits.py")
REPO_FILES = ("config.json", "generation_config.json", "model.safetensors") + CODE_FILES


def prepare_repo_folder(head_dir: str | Path, repo_id: str, out_dir: str | Path, results: list[dict] | None = None,
                        license: str = "apache-2.0", datasets: list[str] | None = None) -> Path:
    """Writes exactly the files of the Hub repo into `out_dir` (created; must not exist yet).

    The head is loaded (so a damaged checkpoint fails here), the card rendered and validated, everything written to
    a temporary folder beside `out_dir` and renamed at the end: on any error nothing is left half-written.
    """
    from hf_jetspec import JetSpecHead

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder")
    head = JetSpecHead.from_pretrained(head_dir)
    card = render_card(head, repo_id, results=results, license=license, datasets=datasets)
    validate_card_metadata(card)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        head.save_pretrained(staging)
        unexpected = sorted(p.name for p in staging.iterdir() if p.name not in REPO_FILES)
        if unexpected:
            raise RuntimeError(f"unexpected files in the head folder: {unexpected}")
        card.save(staging / "README.md")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def publish(folder: str | Path, repo_id: str, private: bool | None = None, token: str | bool | None = None,
            revision: str | None = None, commit_message: str | None = None, create_pr: bool = False) -> str:
    """Creates `repo_id` (if needed; `private` applies to a new repo) and uploads `folder` with `huggingface_hub`
    to `revision` (a branch, created if missing), as a pull request when `create_pr`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload JetSpec head (hf_jetspec)", create_pr=create_pr)
    return str(info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head_dir")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--results", help="JSON list of measured rows for the card")
    parser.add_argument("--method", nargs="+", default=["jetspec"],
                        help="benchmark method(s) whose rows go on the card (e.g. jetspec jetspec:16)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--dry-run", metavar="OUT_DIR", help="write the repo folder here and upload nothing")
    parser.add_argument("--private", action="store_true", help="make a new repo private")
    parser.add_argument("--revision", help="branch to upload to (created if missing)")
    parser.add_argument("--commit-message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", help="Hub token (default: the one `hf auth login` stored)")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text()) if args.results else None
    if isinstance(results, dict):  # a jetspec-bench results.json
        results = rows_from_benchmark(results, args.method)
    if args.dry_run:
        folder = prepare_repo_folder(args.head_dir, args.repo_id, args.dry_run, results, args.license, args.datasets)
        print(f"dry run: {folder} holds what would be uploaded to {args.repo_id}:")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name} ({path.stat().st_size:,} bytes)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_repo_folder(args.head_dir, args.repo_id, Path(tmp) / "repo", results, args.license,
                                     args.datasets)
        print(publish(folder, args.repo_id, private=args.private or None, token=args.token, revision=args.revision,
                      commit_message=args.commit_message, create_pr=args.create_pr))


if __name__ == "__main__":
    main()
