"""Reading raw rows from a file, a folder, the bundled sample or the Hugging Face Hub, through `datasets`.

Files: JSON, JSONL, CSV, Parquet and Arrow, the text formats also compressed (`.gz`, `.bz2`, `.xz`, as
Anthropic ships HH-RLHF). Folders: a dataset saved with `save_to_disk`, or files named by split
(`train.jsonl`, `data/test-00000-of-00001.parquet`, …) as a Hub repository holds them.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from smolalign.errors import UserError, first_line
from smolalign.hub import (
    COMPRESSIONS,
    hub_failure_reason,
    is_data_file_name,
    looks_like_path,
    prefer_local_cache,
)

# The bundled HH-RLHF harmless sample (MIT, Anthropic) ships inside the package: a folder with
# train.jsonl, test.jsonl and LICENSE, named `hh-rlhf-harmless` wherever a dataset is expected.
BUNDLED_NAME = "hh-rlhf-harmless"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled" / BUNDLED_NAME
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
READABLE = "JSON, JSONL, CSV (also .gz, .bz2, .xz compressed), Parquet and Arrow files"


def bundled_dataset(split: str = "train") -> str:
    """Path of one split of the bundled HH-RLHF sample, used when no dataset is named."""
    return str(BUNDLED_DIR / f"{split}.jsonl")


def load_rows(source: str, *, split: str = "train", config_name: str | None = None, data_dir: str | None = None,
              data_files: str | list[str] | None = None) -> datasets.Dataset:
    """Rows of a file, a folder (`split` of it), the bundled sample (its name, `hh-rlhf-harmless`, reads
    `split`), or a Hub dataset's split; with `data_dir` or `data_files`, whatever `datasets.load_dataset`
    reads from them (`source` a Hub id or a builder such as `json`)."""
    path = BUNDLED_DIR if source == BUNDLED_NAME else Path(source).expanduser()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # parse errors become one UserError sentence
    try:
        if data_dir or data_files:
            return _load_hub(source, split, config_name, data_dir=data_dir, data_files=data_files)
        if path.is_file():
            return _load_file(path)
        if path.is_dir():
            return _load_folder(path, split)
        if looks_like_path(source) or is_data_file_name(source):
            raise UserError(f"dataset file '{source}' does not exist.")
        return _load_hub(source, split, config_name)
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


def file_builder(path: Path) -> str | None:
    """The `datasets` builder that reads `path` (by its suffix, under a compression suffix that datasets
    decompresses itself); None if none."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
        if suffixes and suffixes[-1] in (".parquet", ".arrow"):
            return None  # binary formats are compressed inside; datasets reads them uncompressed only
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _load_file(path: Path) -> datasets.Dataset:
    builder = file_builder(path)
    if builder is None:
        raise UserError(f"cannot read '{path}': smolalign reads {READABLE}, not '{''.join(path.suffixes)}'.")
    if path.stat().st_size == 0:
        raise UserError(f"dataset file '{path}' is empty.")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in several exception types
        raise UserError(f"cannot parse '{path}' as {builder.upper()}: {first_line(error)}") from None


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():  # save_to_disk's folders
        loaded = datasets.load_from_disk(str(path))
        return loaded if not isinstance(loaded, datasets.DatasetDict) else _split_of(loaded, split, path)
    try:
        loaded = datasets.load_dataset(str(path))
    except Exception as error:  # no data files, mixed formats, unparsable files
        raise UserError(f"cannot read the folder '{path}' as a dataset ({READABLE}, named by split such as "
                        f"'{split}.jsonl'): {first_line(error)}") from None
    return _split_of(loaded, split, path)


def _split_of(loaded: datasets.DatasetDict, split: str, path: Path) -> datasets.Dataset:
    if split not in loaded:
        raise UserError(f"dataset '{path}' has no split '{split}' (a file named like '{split}.jsonl'); it has "
                        f"{', '.join(loaded)}.")
    return loaded[split]


def _load_hub(name: str, split: str, config_name: str | None, **files) -> datasets.Dataset:
    prefer_local_cache()
    try:
        return datasets.load_dataset(name, config_name, split=split, **files)
    except ValueError as error:
        if "split" in str(error).lower():
            raise UserError(f"dataset '{name}' has no split '{split}'; {first_line(error)}") from None
        raise UserError(f"cannot load dataset '{name}' from the Hub: {first_line(error)}") from None
    except Exception as error:  # connection errors, missing repos, offline mode
        raise UserError(
            f"cannot load dataset '{name}': no such local file, and {hub_failure_reason(error)}; check the name "
            "and the network, or omit 'dataset' for the bundled HH-RLHF pairs."
        ) from None


def load_mixture(sources: list, *, seed: int) -> list[tuple[str, datasets.Dataset]]:
    """The rows of each dataset of a mixture (TRL's `datasets`, alignment-handbook's `dataset_mixture`), named
    for messages: its columns selected, then subsampled as its source asks. alignment-handbook's `weight`
    keeps that share of the dataset's rows, drawn with `seed`; TRL's `fraction`s are shares of the whole
    mixture, each dataset giving its first rows, as many as no dataset has to repeat rows for."""
    loaded = []
    for source in sources:
        name = source.path + (f" ({source.split})" if source.split != "train" else "")
        rows = load_rows(source.path, split=source.split, config_name=source.name, data_dir=source.data_dir,
                         data_files=source.data_files)
        if source.columns:
            missing = [column for column in source.columns if column not in rows.column_names]
            if missing:
                raise UserError(f"dataset '{name}' has no column {', '.join(map(repr, missing))} to select; its "
                                f"columns are {', '.join(rows.column_names)}.")
            rows = rows.select_columns(source.columns)
        if source.weight is not None:
            rows = rows.shuffle(seed=seed).select(range(int(len(rows) * source.weight)))
        loaded.append((name, rows))
    fractions = [source.fraction for source in sources]
    if any(fraction is not None for fraction in fractions):
        if None in fractions:
            raise UserError("'fraction' must be set for every dataset of the mixture or for none.")
        shares = [fraction / sum(fractions) for fraction in fractions]
        total = min(len(rows) / share for (_, rows), share in zip(loaded, shares, strict=True) if share > 0)
        loaded = [(name, rows.select(range(round(share * total))))
                  for (name, rows), share in zip(loaded, shares, strict=True)]
    return loaded
