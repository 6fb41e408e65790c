"""Where a dataset's rows come from, and what identifies their content for the cache key.

`data.datasets[i].path` names one of:
- file:   a local .jsonl / .json / .parquet / .csv / .arrow file, read by dtrain.data.readers (errors say file:line);
- glob:   a pattern of such files (`data/part-*.parquet`), read with `datasets.load_dataset(<format>, data_files=...)`;
- saved:  a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, read with `load_from_disk`;
- folder: any other local folder `datasets.load_dataset` understands (data files, a README with configs);
- hub:    a Hub dataset id (`org/name`). It is resolved to a snapshot in the local Hugging Face cache (dtrain.hub:
  downloaded where there is network; with HF_HUB_OFFLINE, as on the ranks, only the cache is read) and then read
  like a folder, so `name`, `split` and `data_files` mean what they mean to `load_dataset`, and the resolved commit
  is the content key: nothing is hashed.
Rows of every source but a single file are named "<path> (split S) row index I", the index `dataset[I]` gives.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dtrain import hub
from dtrain.config.data import DATA_FILE_BUILDERS, source_kind
from dtrain.data.errors import DataError
from dtrain.data.readers import RowOrError, read_rows


@dataclass(frozen=True)
class Source:
    kind: Literal["file", "glob", "saved", "folder", "hub"]
    given: str
    """The path or repo id as the user wrote it (what messages and reports show)."""
    local: Path | None = None
    """The file or folder that is read (hub: the snapshot folder); None for a glob."""
    commit: str | None = None
    """Hub datasets: the resolved commit."""

    def files(self) -> list[Path]:
        """The files whose contents identify the data, in a fixed order."""
        if self.kind == "file":
            if not self.local.is_file():
                raise DataError(f"{self.local}: file not found")
            return [self.local]
        if self.kind == "glob":
            return [Path(p) for p in sorted(glob.glob(self.given, recursive=True)) if Path(p).is_file()]
        if self.kind in ("saved", "folder"):
            return sorted(p for p in self.local.rglob("*") if p.is_file() and ".cache" not in p.parts)
        return []  # hub: the commit says it all

    def content_key(self, digest: Callable[[Path], str]) -> dict[str, Any]:
        if self.kind == "hub":
            return {"hub_commit": self.commit}
        files = self.files()
        if not files:
            raise DataError(f"{self.given}: no files match")
        digests = [digest(f) for f in files]
        # A folder's layout decides splits and configs, so names inside it count; a file's or glob's path does not.
        names = [str(f.relative_to(self.local)) for f in files] if self.kind in ("saved", "folder") else None
        return {"kind": self.kind, "sha256": digests, "names": names}


def resolve_source(ds) -> Source:
    given = str(ds.path)
    path = Path(given)
    kind = source_kind(given)
    if kind in ("glob", "file"):
        return Source(kind, given, None if kind == "glob" else path)
    if kind == "folder":
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        return Source("saved" if saved else "folder", given, path)
    if kind == "hub":
        return _resolve_hub(given, ds.revision)
    raise DataError(f"{given}: neither a local file, glob, folder, nor a Hub dataset id (org/name)")


def _resolve_hub(repo_id: str, revision: str | None) -> Source:
    try:
        resolved = hub.resolve(repo_id, revision, repo_type="dataset")
    except hub.HubError as e:
        raise DataError(str(e)) from None
    return Source("hub", repo_id, resolved.local, commit=resolved.commit)


def read_source(source: Source, ds) -> Iterator[RowOrError]:
    """(where, row) pairs in the source's order; see dtrain.data.readers for the single-file case."""
    if source.kind == "file":
        yield from read_rows(source.local)
        return
    split = ds.split
    table = _load_table(source, ds, split)
    for index, row in enumerate(table):
        yield f"{source.given} (split {split}) row index {index}", row


def _load_table(source: Source, ds, split: str):
    import datasets

    try:
        if source.kind == "saved":
            loaded = datasets.load_from_disk(str(source.local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if source.kind == "glob":
            files = [str(f) for f in source.files()]
            if not files:
                raise DataError(f"{source.given}: no files match")
            return datasets.load_dataset(_builder_for(source.given, files), data_files=files, split="train")
        return datasets.load_dataset(str(source.local), name=ds.name, data_files=ds.data_files, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "cannot read this"; the message is what helps
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{source.given}: cannot load split {split!r}: {type(e).__name__}: {first_line}") from None


def _builder_for(pattern: str, files: list[str]) -> str:
    builders = {DATA_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        suffixes = sorted({Path(f).suffix for f in files})
        raise DataError(f"{pattern}: matches files of several or unknown types {suffixes}; use one of .jsonl, "
                        ".json, .parquet, .csv, .arrow per dataset entry")  # fmt: skip
    return builders.pop()
