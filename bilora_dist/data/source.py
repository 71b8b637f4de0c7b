"""Opening a dataset as a `datasets.Dataset` of raw records: a file, a saved `datasets` directory, a folder of
data files, or a dataset name found in the local Hugging Face cache (never downloaded).

A source is located first (`locate`: which files hold its content, so a cache key can hash them without
parsing anything), and read only when its tokenized form is not cached (`Source.read`).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from unittest import mock

import datasets
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.utils import logging as hf_hub_logging

from bilora_dist.errors import UserError

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # text formats only, as `datasets` reads them
_NOT_CACHED = (ConnectionError, FileNotFoundError)  # what an offline load of an uncached name raises


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets` or the hub client (an error must stay one line on stderr; its JSON reader logs
    the errors it raises)."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    hub_verbosity = hf_hub_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hf_hub_logging.set_verbosity(hf_hub_logging.CRITICAL)  # "Repo card metadata block was not found" for a folder
    try:
        yield
    finally:
        hf_hub_logging.set_verbosity(hub_verbosity)
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


@dataclass(frozen=True)
class Source:
    """Where a dataset's records are. `files` are every file its content is read from, in a fixed order."""

    spec: str  # as given, for messages
    kind: str  # "file", "saved" (by save_to_disk), "folder" (of data files, e.g. a hub snapshot) or "cached"
    location: str  # the file, the directory, or the dataset name
    files: tuple[Path, ...]
    split: str | None = None

    @property
    def row_word(self) -> str:
        """How error lines count records: JSON lines by line, a JSON array by record, tables by row."""
        return {".jsonl": "line", ".json": "record"}.get(file_type(Path(self.location)), "row") if self.kind == "file" \
            else "row"

    def read(self, flag: str, work_dir: Path) -> datasets.Dataset:
        """The raw records; `work_dir` receives any Arrow conversion. UserError (one line) if unreadable or empty."""
        with quiet_datasets():
            if self.kind == "file":
                ds = _read_file(Path(self.location), flag, self.spec, work_dir)
            elif self.kind == "saved":
                try:
                    ds = _pick_split(datasets.load_from_disk(self.location), self.split, flag, self.spec)
                except (FileNotFoundError, ValueError) as exc:
                    raise UserError(f"{flag} {self.spec}: not a readable saved datasets directory ({exc})") from None
            elif self.kind == "folder":
                try:
                    ds = _pick_split(datasets.load_dataset(self.location, cache_dir=str(work_dir)), self.split, flag,
                                     self.spec)
                except (DatasetGenerationError, FileNotFoundError, ValueError) as exc:
                    raise UserError(f"{flag} {self.spec}: neither a saved datasets directory nor a folder of data "
                                    f"files `datasets` can read ({exc.__cause__ or exc})") from None
            else:
                ds = _load_cached_name(self.location, self.split, flag)
        if len(ds) == 0:
            raise UserError(f"{flag} {self.spec}: dataset is empty")
        return ds

    def number(self, index: int) -> int:
        """The 1-based line/record/row number of dataset row `index` (JSON lines: blank lines count)."""
        if self.row_word != "line":
            return index + 1
        with open_text(Path(self.location)) as f:
            seen = -1
            for lineno, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == index:
                    return lineno
        return index + 1


def _readable(source: Source, flag: str) -> Source:
    """`source`, once each of its files opens for reading; else a UserError naming the first that does not."""
    for path in source.files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            where = "" if source.kind == "file" else f" {path}"
            raise UserError(f"{flag} {source.spec}:{where} cannot be read ({exc.strerror or exc})") from None
    return source


def locate(spec: str, flag: str) -> Source:
    """The source `spec` names: a file, a directory (saved by `save_to_disk`, or a folder of data files) with an
    optional `:SPLIT`, or `NAME[:SPLIT]` of a dataset in the local Hugging Face cache (hub snapshots in
    HF_HUB_CACHE, then datasets prepared by `load_dataset` in HF_DATASETS_CACHE)."""
    path = Path(spec)
    if path.is_file():
        kind, compressed = file_type(path), path.suffix in COMPRESSIONS
        if kind not in LOADERS or (kind == ".parquet" and compressed):
            shown = kind + path.suffix if compressed else path.suffix
            raise UserError(f"{flag} {spec}: unsupported file type '{shown}' (use .jsonl, "
                            ".json or .csv, each also .gz/.bz2/.xz compressed, .parquet, a datasets dir or a cached "
                            "dataset name)")
        return _readable(Source(spec, "file", spec, (path,)), flag)
    base, split = spec.rsplit(":", 1) if ":" in spec and not path.exists() else (spec, None)
    if Path(base).is_dir():
        saved = any((Path(base) / f).is_file() for f in ("state.json", "dataset_dict.json"))
        return _readable(Source(spec, "saved" if saved else "folder", base, _files_under(Path(base)), split), flag)
    if Path(base).exists() or file_type(Path(base)) in LOADERS or base.startswith(("/", ".", "~")) or base.count("/") > 1:
        raise UserError(f"{flag}: file not found: {spec}")
    return _locate_name(spec, base, split, flag)


def _files_under(root: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in root.rglob("*") if p.is_file()))


def _locate_name(spec: str, name: str, split: str | None, flag: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
        return Source(spec, "folder", str(snapshot), _files_under(snapshot), split)
    except (LocalEntryNotFoundError, HFValidationError):
        pass
    with quiet_datasets():
        try:
            ds = _load_cached_name(name, split, flag)
        except _NOT_CACHED:
            raise UserError(f"{flag}: '{name}' is neither a file nor a dataset in the local Hugging Face cache "
                            f"(looked in {datasets.config.HF_DATASETS_CACHE} and HF_HUB_CACHE; nothing is "
                            "downloaded)") from None
    return Source(spec, "cached", name, tuple(Path(f["filename"]) for f in ds.cache_files), split)


def _load_cached_name(name: str, split: str | None, flag: str) -> datasets.Dataset:
    """A dataset prepared earlier by `datasets.load_dataset(name)`, read offline from HF_DATASETS_CACHE."""
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        return _pick_split(datasets.load_dataset(name), split, flag, name)


def _pick_split(ds: datasets.Dataset | datasets.DatasetDict, split: str | None, flag: str,
                spec: str) -> datasets.Dataset:
    """`split` of a DatasetDict (default: train, else the first); a plain Dataset takes no split."""
    if isinstance(ds, datasets.Dataset):
        if split:
            raise UserError(f"{flag} {spec}: has no splits, so ':{split}' names nothing")
        return ds
    if split and split not in ds:
        raise UserError(f"{flag} {spec}: no split '{split}' (splits: {', '.join(ds)})")
    return ds[split or ("train" if "train" in ds else next(iter(ds)))]


def file_type(path: Path) -> str:
    """The data format's suffix of `path`, under a compression suffix: '.jsonl' for both a.jsonl and a.jsonl.gz."""
    return path.suffixes[-2] if path.suffix in COMPRESSIONS and len(path.suffixes) > 1 else path.suffix


def open_text(path: Path) -> IO[str]:
    """`path` opened as UTF-8 text, decompressed if its suffix says it is compressed."""
    opener = COMPRESSIONS.get(path.suffix)
    return opener(path, "rt", encoding="utf-8") if opener else open(path, encoding="utf-8")


def _has_text(path: Path) -> bool:
    """Whether the (decompressed) file holds anything but whitespace."""
    with open_text(path) as f:
        return any(line.strip() for line in f)


def _read_file(path: Path, flag: str, spec: str, work_dir: Path) -> datasets.Dataset:
    try:
        empty = path.stat().st_size == 0 or (file_type(path) != ".parquet" and not _has_text(path))
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise UserError(f"{flag} {spec}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if empty:
        raise UserError(f"{flag} {spec}: dataset is empty")
    try:
        return datasets.load_dataset(LOADERS[file_type(path)], data_files=str(path), split="train",
                                     cache_dir=str(work_dir))
    except DatasetGenerationError as exc:
        raise UserError(f"{flag} {spec}: {_json_problem(path) or f'cannot be read ({exc.__cause__ or exc})'}") from None
    except ValueError as exc:  # `datasets`' own JSON pass (mixed-type fields) fails outside its wrapper
        raise UserError(f"{flag} {spec}: {_json_problem(path) or f'cannot be read ({exc})'}") from None


def _json_problem(path: Path) -> str | None:
    """Where a JSON file that `datasets` could not read is broken, worded as a person would look for it."""
    if file_type(path) == ".jsonl":
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        return f"line {lineno}: malformed JSON ({exc.msg})"
                    if not isinstance(record, dict):
                        return f"line {lineno}: not a JSON object"
        return None
    if file_type(path) == ".json":
        try:
            with open_text(path) as f:
                loaded = json.load(f)
        except json.JSONDecodeError as exc:
            return f"malformed JSON at line {exc.lineno} ({exc.msg})"
        if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
            return "expected a JSON array of records"
    return None
