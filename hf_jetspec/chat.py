"""Prompt encoding shared by the demo, benchmarks and training."""

from __future__ import annotations

import torch


def chat_input_ids(tokenizer, prompt: str) -> torch.LongTensor:
    """`(1, n)` token ids of a one-turn chat with the tokenizer's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def chat_messages_ids(tokenizer, messages: list[dict]) -> torch.LongTensor:
    """`(1, n)` token ids of a conversation (`[{"role", "content"}, ...]`, ending in a user turn), ready for the reply."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
