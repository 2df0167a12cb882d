"""The `data:` section of a job config: where records come from, how they become shards, how they stream."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infinitune.data_pipeline.formats import REPAIRS
from infinitune.typed_config import Section, require

Format = Literal["auto", "alpaca", "sharegpt", "messages"]


class SourceConfig(Section):
    """One input source; several are mixed by weight."""

    path: str
    """A JSON, JSONL or parquet file, a directory or glob of them, a directory written by
    `datasets.Dataset.save_to_disk`, or a name `datasets.load_dataset` understands (hub names need a network)."""

    format: Format = "auto"
    """Record layout: alpaca (instruction/input/output), sharegpt (conversations[{from, value}]), messages
    (OpenAI `messages[{role, content}]`), or auto (detected from the first records of the source)."""

    weight: float = 1.0
    """How much of this source to use: 1.0 once, 2.0 twice (each copy packed apart), 0.5 a seeded half."""

    split: str = "train"
    """The split to read when `path` is a dataset name or a saved dataset with several splits."""

    columns: dict[str, str] = Field(default_factory=dict)
    """Rename record fields before detection, e.g. {prompt: instruction, response: output}."""

    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(default_factory=dict)
    """Extra role names and what they mean (system, user, assistant or tool), e.g. {narrator: system}."""

    repairs: list[str] = Field(default_factory=lambda: ["leading_assistant", "merge_consecutive"])
    """Conversations (sharegpt, messages) whose turn order is repaired instead of refused, each repaired record
    counted by repair in the manifest and listed in repaired.jsonl: leading_assistant (assistant or tool turns
    before the first user turn are dropped: the scrape lost the question), merge_consecutive (two user turns, or
    two assistant turns, in a row become one, joined by a blank line). [] refuses such conversations."""

    def check(self) -> None:
        require(bool(self.path.strip()), "path", "must name a file, directory or dataset")
        require(0 < self.weight <= 100, "weight", f"must be in (0, 100]; got {self.weight}")
        for name in self.repairs:
            require(name in REPAIRS, "repairs", f"{name!r} is not a repair; known: {', '.join(REPAIRS)}")


class DataConfig(Section):
    """Instruction data: sources, templating and masking, packing, shards and the training stream."""

    sources: list[SourceConfig] = Field(default_factory=list)
    """Input sources, mixed by their weights."""

    seq_len: int = 1024
    """Tokens per training sample. Documents are packed into sequences of exactly this length."""

    packing: bool = True
    """Pack several documents into each sequence (attention never crosses documents). Off: one document
    per sequence, padded."""

    train_on: Literal["assistant", "all", "last"] = "assistant"
    """Which tokens carry loss: every assistant turn, all tokens, or only the last assistant turn."""

    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with a record longer than seq_len: keep its first seq_len tokens, or drop it (counted)."""

    val_fraction: float = 0.02
    """Fraction of records held out for validation (a seeded choice per record)."""

    shards_dir: str = "runs/shards"
    """Where `prepare` writes the WebDataset shards and manifest.json; training reads them from here.
    A local directory or a URL webdataset/fsspec can read (file:, http(s):, pipe:, s3://)."""

    chat_template: str | None = None
    """A Jinja chat template (the text, or a path to a .jinja file) to use instead of the tokenizer's.
    Tokenizers without a template get the documented fallback (docs/data.md)."""

    seed: int = Field(0, ge=0)
    """Seed for the validation split and weight sampling (prepare) and the sample order (stream)."""

    samples_per_shard: int = Field(2048, gt=0)
    """Packed samples per tar shard (2048 x 2048 tokens is about 50 MB)."""

    records_per_chunk: int = Field(20000, gt=0)
    """Records handled as one unit of work by `prepare`. Output depends on it, not on the process count."""

    num_proc: int = Field(0, ge=0)
    """Processes for `prepare` (0: one per CPU core)."""

    shuffle: bool = True
    """Shuffle the training order (shards, then samples within a window); off: manifest order."""

    shuffle_window: int = Field(16384, gt=0)
    """Samples shuffled together. The order is a permutation of shards, then of samples within windows of
    whole shards holding at least this many samples; a resume re-reads at most one window."""

    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per training rank."""

    verify: Literal["sha256", "size", "none"] = "sha256"
    """How shards are checked against the manifest before training: full checksum, size only, or not."""

    def check(self) -> None:
        require(len(self.sources) > 0, "sources", "list at least one source, e.g. [{path: data/train.jsonl}]")
        require(8 <= self.seq_len <= 1_048_576, "seq_len", f"must be in [8, 1048576]; got {self.seq_len}")
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1); got {self.val_fraction}")
        require(bool(self.shards_dir.strip()), "shards_dir", "must name a directory")
