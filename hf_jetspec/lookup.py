"""Prompt-lookup proposals as one more branch of the head's tree, with a measured acceptance profile.

Transformers' `PromptLookupCandidateGenerator` finds the last tokens' n-gram earlier in the sequence and proposes what
followed it. Where a response copies its prompt (rewrites, quotes, code edits) those proposals run long and right;
where it does not they are wrong. The head drafts everything else. Merged into one tree (see `tree.merge_chain`),
a round verifies both in one target forward, and every token is still the target's own choice, so the output is
unchanged: a proposal only decides which rows the forward computes.

Whether a proposal is worth its rows is learned on the fly. Each round's proposal is scored afterwards against what
the target actually wrote at those positions (whether or not it was verified), so [`LookupProfile`] measures
`P(the first d proposed tokens are the target's)` without ever having to try a proposal to learn about it. The
probability is kept per "state": how many tokens of the previous round's proposal turned out right (0, 1, 2, 3+).
A response that is copying keeps copying.
"""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

STATES = 4  # previous proposal right for 0, 1, 2, 3+ tokens
DEFAULT_NUM_TOKENS = 10  # Transformers' own default for `prompt_lookup_num_tokens`


def prompt_lookup_tokens(value, tree_budget) -> int:
    """Longest proposal from `head.generation_config.prompt_lookup_num_tokens`, as used (0: no proposals).

    Unset (`None`) means on with `tree_budget="auto"` (which keeps only the tokens that pay, see `planning.py`) and off
    with a fixed budget (a fixed tree stays the head's own); an int asks for proposals of up to that many tokens with
    any budget (a fixed budget then verifies them whole, on top of its nodes).
    """
    if value is None:
        return DEFAULT_NUM_TOKENS if tree_budget == "auto" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`prompt_lookup_num_tokens` must be None or an int >= 0 (0: off), got {value!r}")
    return value


class LookupProfile:
    """Decayed counts of how far prompt-lookup proposals matched the target, per depth and state.

    Args:
        max_depth (`int`): longest proposal tracked.
        decay (`float`): weight kept by the old counts per resolved proposal of a state.
        prior_weight (`float`): pseudo-count of the prior at every depth.
        prior (`tuple[float, ...]`): per state, the prior per-token match rate `r` (depth `d`: `r ** d`). Low on
            purpose: every proposal is scored whether or not it was verified, so a low prior costs no exploration.
    """

    def __init__(self, max_depth: int = 32, decay: float = 0.99, prior_weight: float = 2.0,
                 prior: tuple[float, ...] = (0.05, 0.15, 0.3, 0.45)):
        if len(prior) != STATES:
            raise ValueError(f"`prior` needs one rate per state ({STATES}), got {prior}")
        self.max_depth, self.decay, self.prior_weight, self.prior = max_depth, decay, prior_weight, prior
        self.offered = [[0.0] * max_depth for _ in range(STATES)]
        self.matched = [[0.0] * max_depth for _ in range(STATES)]

    def probabilities(self, state: int, length: int) -> list[float]:
        """`P(tokens 1..d of a proposal all match)` for `d = 1 .. length`, non-increasing."""
        out, last = [], 1.0
        for depth in range(1, min(length, self.max_depth) + 1):
            prior = self.prior[state] ** depth
            offered, matched = self.offered[state][depth - 1], self.matched[state][depth - 1]
            last = min(last, (matched + self.prior_weight * prior) / (offered + self.prior_weight))
            out.append(last)
        return out + [0.0] * (length - len(out))

    def observe(self, state: int, length: int, matched: int) -> None:
        """One resolved proposal of `length` tokens whose first `matched` tokens were the target's."""
        for depth in range(1, min(length, self.max_depth) + 1):
            self.offered[state][depth - 1] = self.decay * self.offered[state][depth - 1] + 1.0
            self.matched[state][depth - 1] = self.decay * self.matched[state][depth - 1] + (depth <= matched)


def matched_prefix(proposal: list[int], actual: list[int]) -> int:
    """How many leading tokens of `proposal` equal `actual` (as far as `actual` goes)."""
    count = 0
    for want, got in zip(proposal, actual):
        if want != got:
            break
        count += 1
    return count


class PromptLookupDraft:
    """Per-round prompt-lookup proposals for one `generate()` call, scored against the target's tokens afterwards.

    Args:
        num_tokens (`int`): longest proposal (`prompt_lookup_num_tokens`).
        max_ngram_size (`int`): longest n-gram matched (`max_matching_ngram_size`).
        eos_token_id (`torch.Tensor`, *optional*): proposals stop before an EOS token (as in Transformers).
        max_length (`int`): the call's `max_length` (no proposal runs past it).
        profile ([`LookupProfile`], *optional*): where resolved proposals are counted (default: a fresh one).
    """

    def __init__(self, num_tokens: int, max_ngram_size: int, eos_token_id: torch.Tensor | None, max_length: int,
                 profile: LookupProfile | None = None):
        self.generator = PromptLookupCandidateGenerator(
            eos_token_id=eos_token_id, num_output_tokens=num_tokens, max_matching_ngram_size=max_ngram_size,
            max_length=max_length,
        )
        self.profile = profile if profile is not None else LookupProfile()
        self.pending: list[tuple[int, list[int], int]] = []  # (first position, tokens, state) not resolved yet
        self.previous: tuple[int, list[int]] | None = None  # last round's proposal: (first position, tokens)

    def _resolve(self, tokens: torch.LongTensor) -> None:
        still = []
        for start, proposal, state in self.pending:
            actual = tokens[start : start + len(proposal)].tolist()
            matched = matched_prefix(proposal, actual)
            if matched < len(actual) or len(actual) == len(proposal):  # a mismatch, or every position written
                self.profile.observe(state, len(proposal), matched)
            else:
                still.append((start, proposal, state))
        self.pending = still

    def state(self, tokens: torch.LongTensor) -> int:
        """Tokens of the previous round's proposal known to be right so far, capped at `STATES - 1`."""
        if self.previous is None:
            return 0
        start, proposal = self.previous
        return min(matched_prefix(proposal, tokens[start : start + len(proposal)].tolist()), STATES - 1)

    def propose(self, input_ids: torch.LongTensor) -> tuple[list[int], list[float]]:
        """This round's proposal for the positions after `input_ids` (one sequence, `(1, length)`) and
        `P(its first d tokens are the target's)` for each depth `d`; both empty when nothing matches."""
        tokens = input_ids[0]
        self._resolve(tokens)
        state = self.state(tokens)
        candidates, _ = self.generator.get_candidates(input_ids)
        proposal = candidates[0, input_ids.shape[1] :].tolist()
        if not proposal:
            self.previous = None
            return [], []
        start = input_ids.shape[1]
        self.previous = (start, proposal)
        self.pending.append((start, proposal, state))
        return proposal, self.profile.probabilities(state, len(proposal))
