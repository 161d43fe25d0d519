"""hf_jetspec_hub: model cards for JetSpec heads, and preparing/publishing head repos."""

from .card import render_card, validate_card_metadata
from .publish import prepare_repo_folder, publish

__all__ = ["prepare_repo_folder", "publish", "render_card", "validate_card_metadata"]
