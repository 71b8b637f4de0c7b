"""From a data source to the tokenized examples every rank reads.

The main rank checks and tokenizes the records once with `datasets.map` (batched, `workers` processes) and
saves the result in an on-disk cache; every rank then memory-maps it (Arrow), so no rank holds the dataset as
Python objects. The cache key hashes everything the tokens depend on: the bytes of every file the data is read
from, the tokenizer's full definition (vocabulary, normalisation, special tokens, chat template), the record
format, the tokenize options, the code of this package and the library versions. An entry is written in a
temporary directory and renamed into place, so a killed run never leaves a partial entry behind. The key hashes
the inputs, not the entry: each entry's meta.json records the SHA-256 of its files, checked whenever it is read
(one sequential read of the entry); an entry changed on disk since is rebuilt, with one line saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from bilora_dist.data.batching import IGNORE
from bilora_dist.data.formats import detect_format, record_error
from bilora_dist.data.source import Source, locate, quiet_datasets
from bilora_dist.data.tokenize import TokenizeOptions, tokenize_record
from bilora_dist.model.embedded import cache_dir
from bilora_dist.engines.base import Engine
from bilora_dist.files import atomic_directory, hash_bytes
from bilora_dist.errors import UserError

TOKEN_COLUMNS = ["input_ids", "labels"]
RECORDS_PER_WORKER = 20_000  # --data-workers 0 starts one tokenizing process per this many records (up to 4)
_CODE = Path(__file__).parent


@dataclass(frozen=True)
class Prepared:
    """Tokenized examples (`input_ids`, `labels`) and the raw records they came from, row for row."""

    examples: datasets.Dataset
    records: datasets.Dataset
    fmt: str


class _BadRow(Exception):
    """A record that fails its check or cannot be tokenized, by dataset row (picklable across map workers)."""

    def __init__(self, index: int, problem: str):
        super().__init__(index, problem)
        self.index, self.problem = index, problem


def cache_root(setting: str) -> Path | None:
    """The data cache directory of --data-cache ("": under the bilora_dist cache; "none": no cache)."""
    if setting.lower() == "none":
        return None
    return Path(setting).expanduser() if setting else cache_dir() / "data"


def prepare_examples(spec: str, flag: str, tokenizer: Any, options: TokenizeOptions, fmt: str = "auto",
                     workers: int = 0, cache: str = "", engine: Engine | None = None,
                     log: Callable[[str], None] = print) -> Prepared:
    """The tokenized examples of data source `spec`, prepared once by the main rank and read by all.

    With the cache off ("none") every rank tokenizes for itself, in memory. A rank that does not see the main
    rank's cache entry (a cache directory that is not shared) prepares its own.
    """
    engine = engine or Engine()
    root = cache_root(cache)
    if root is None:
        with tempfile.TemporaryDirectory() as work:
            ds, fmt_used, n, seconds = _tokenize(locate(spec, flag), flag, tokenizer, options, fmt, workers, Path(work),
                                                 in_memory=True)
        if engine.is_main:
            log(f"{flag} {spec}: {n} {fmt_used} records -> {len(ds)} examples in {seconds:.1f}s (cache off)")
        return _split(ds, fmt_used)
    outcome, failure = None, None
    if engine.is_main:
        try:
            outcome = ("ok", str(_entry(spec, flag, tokenizer, options, fmt, workers, root, log)))
        except Exception as exc:  # every rank learns of it, instead of waiting for the main rank forever
            outcome, failure = ("user" if isinstance(exc, UserError) else "crash", str(exc)), exc
    kind, value = engine.gather_object(outcome)[0]
    if failure is not None:
        raise failure
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"the main rank failed preparing {flag}: {value}")
    entry = Path(value)
    if not entry.is_dir():  # the main rank's cache is not on a filesystem this rank sees
        entry = _entry(spec, flag, tokenizer, options, fmt, workers, root, lambda _: None)
    with quiet_datasets():
        ds = datasets.load_from_disk(str(entry / "dataset"))
    return _split(ds, json.loads((entry / "meta.json").read_text())["format"])


def _split(ds: datasets.Dataset, fmt: str) -> Prepared:
    raw = [c for c in ds.column_names if c not in TOKEN_COLUMNS]
    return Prepared(ds.select_columns(TOKEN_COLUMNS), ds.select_columns(raw), fmt)


def _entry(spec: str, flag: str, tokenizer: Any, options: TokenizeOptions, fmt: str, workers: int, root: Path,
           log: Callable[[str], None]) -> Path:
    """The cache entry of this data, tokenizer, format and options; built (atomically) if missing."""
    source = locate(spec, flag)
    key = cache_key(source, tokenizer, options, fmt)
    entry = root / key
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("sha256") == entry_digest(entry):
            log(f"{flag} {spec}: {meta['examples']} tokenized examples read from the cache {entry}")
            return entry
        log(f"warning: {flag} {spec}: the cached tokenized examples in {entry} no longer match their checksum "
            "(changed on disk); rebuilding them")
        stale = root / f".stale-{key}-{uuid.uuid4().hex[:8]}"
        try:
            entry.rename(stale)
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(entry, exists="keep", mode=0o755) as tmp:  # 0755: a shared cache's other users read it
        ds, fmt_used, n, seconds = _tokenize(source, flag, tokenizer, options, fmt, workers, tmp / "work")
        with quiet_datasets():
            ds.save_to_disk(str(tmp / "dataset"))
        meta = {"source": spec, "format": fmt_used, "records": n, "examples": len(ds), "seconds": seconds}
        del ds
        shutil.rmtree(tmp / "work")
        meta["sha256"] = entry_digest(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta))
    log(f"{flag} {spec}: {n} {fmt_used} records -> {meta['examples']} examples, tokenized with "
        f"{_num_workers(workers, n)} worker(s) in {seconds:.1f}s; cached in {entry}")
    return entry


def entry_digest(entry: Path) -> str:
    """SHA-256 of the files `save_to_disk` wrote for a cache entry (their names relative to it, and their bytes;
    not the `cache-*` files `datasets` may add next to them when the examples are later selected or shuffled)."""
    h = hashlib.sha256()
    for path in sorted(p for p in (entry / "dataset").rglob("*") if p.is_file() and not p.name.startswith("cache-")):
        h.update(str(path.relative_to(entry)).encode() + b"\0")
        hash_bytes(h, path)
    return h.hexdigest()


def _tokenize(source: Source, flag: str, tokenizer: Any, options: TokenizeOptions, fmt: str, workers: int,
              work: Path, in_memory: bool = False) -> tuple[datasets.Dataset, str, int, float]:
    """(examples with their raw columns, the format, the number of records read, seconds) for `source`;
    the examples are written under `work`, or kept in memory."""
    start = time.perf_counter()
    raw = source.read(flag, work / "raw")
    where = f"{flag} {source.spec}"
    fmt = detect_format(raw.column_names, where) if fmt == "auto" else fmt
    kept = {c: f for c, f in raw.features.items() if c not in TOKEN_COLUMNS}  # a raw `input_ids` column is not kept
    features = datasets.Features({**kept, **{c: datasets.List(datasets.Value("int32")) for c in TOKEN_COLUMNS}})
    processes = _num_workers(workers, len(raw))
    try:
        with quiet_datasets():
            ds = raw.map(_tokenize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                         features=features, num_proc=processes if processes > 1 else None,  # 1 would fork one
                         fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "options": options},
                         keep_in_memory=in_memory, cache_file_name=None if in_memory else str(work / "tokenized.arrow"),
                         new_fingerprint=uuid.uuid4().hex)  # a label only: skips hashing the tokenizer
    except _BadRow as bad:
        raise UserError(f"{where}: {source.row_word} {source.number(bad.index)}: {bad.problem}") from None
    if len(ds) == 0:
        raise UserError(f"{flag}: no record keeps a supervised token within --seq-len {options.seq_len}")
    return ds, fmt, len(raw), time.perf_counter() - start


def _num_workers(workers: int, n_records: int) -> int:
    """--data-workers, where 0 is one process per RECORDS_PER_WORKER records, at most min(4, CPUs)."""
    return workers or max(1, min(4, os.cpu_count() or 1, n_records // RECORDS_PER_WORKER))


def _tokenize_batch(batch: dict[str, list[Any]], indices: list[int], fmt: str, tokenizer: Any,
                    options: TokenizeOptions) -> dict[str, list[Any]]:
    """Check and tokenize a batch of records, keeping those with a supervised token to predict."""
    raw = [c for c in batch if c not in TOKEN_COLUMNS]
    out: dict[str, list[Any]] = {c: [] for c in [*raw, *TOKEN_COLUMNS]}
    for j, index in enumerate(indices):
        record = {k: v[j] for k, v in batch.items() if v[j] is not None}  # Arrow fills absent keys with None
        problem = record_error(record, fmt)
        if problem:
            raise _BadRow(index, problem)
        try:
            tokens = tokenize_record(record, fmt, tokenizer, options)
        except UserError as exc:
            raise _BadRow(index, str(exc)) from None
        if any(t != IGNORE for t in tokens["labels"][1:]):
            for k in raw:
                out[k].append(batch[k][j])
            for k in TOKEN_COLUMNS:
                out[k].append(tokens[k])
    return out


def cache_key(source: Source, tokenizer: Any, options: TokenizeOptions, fmt: str) -> str:
    """Hex digest of everything the tokenized examples depend on."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    settings = {"kind": source.kind, "split": source.split, "format": fmt, "options": dataclasses.asdict(options),
                "versions": [datasets.__version__, transformers.__version__, tokenizers.__version__]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    for path in sorted(_CODE.glob("*.py")):
        h.update(path.read_bytes())
    location = Path(source.location)
    for path in source.files:
        h.update(str(path.relative_to(location) if location.is_dir() else path.name).encode())
        hash_bytes(h, path)
    return h.hexdigest()[:32]


def tokenizer_digest(tokenizer: Any) -> str:
    """Hex digest of a tokenizer's behaviour: its full definition, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's whole definition, as JSON
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    spec = {"class": type(tokenizer).__name__, "definition": definition, "chat_template": tokenizer.chat_template,
            "special": tokenizer.special_tokens_map, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
