"""Training data from where users keep it: a json/jsonl/parquet file, a folder ``datasets`` saved,
or a hub id; checked (one sentence, before any model is loaded) and loaded as a ``datasets.Dataset``."""

from __future__ import annotations

from pathlib import Path

DATASET_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> datasets builder


def check_dataset_source(source: str) -> None:
    """Refuse a local path that cannot be a dataset; anything else is taken as a hub id."""
    path = Path(source)
    looks_local = path.suffix in DATASET_FORMATS or source.startswith((".", "/", "~")) or path.exists()
    if not looks_local:
        return
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"Dataset {path} does not exist; pass a json/jsonl/parquet file, a saved datasets folder "
                         "or a hub id.")
    if path.is_file() and path.suffix not in DATASET_FORMATS:
        raise ValueError(f"Dataset {path} is a {path.suffix or 'suffix-less'} file; training reads "
                         f"{', '.join(DATASET_FORMATS)} files, a folder saved by datasets, or a hub id.")


def load_training_dataset(source: str, split: str = "train"):
    """The ``split`` of ``source`` (a file's rows are its train split)."""
    import datasets

    check_dataset_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_file():
        return datasets.load_dataset(DATASET_FORMATS[path.suffix], data_files=str(path), split="train")
    return datasets.load_dataset(source, split=split)
