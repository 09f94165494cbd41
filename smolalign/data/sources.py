"""Reading raw rows from a local file or the Hugging Face Hub, through `datasets`."""

from __future__ import annotations

from pathlib import Path

import datasets

from smolalign.errors import UserError, first_line
from smolalign.hub import hub_failure_reason, looks_like_path, prefer_local_cache

# The bundled HH-RLHF harmless sample (MIT, Anthropic) ships inside the package: a folder with
# train.jsonl, test.jsonl and LICENSE, named `hh-rlhf-harmless` wherever a dataset is expected.
BUNDLED_NAME = "hh-rlhf-harmless"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled" / BUNDLED_NAME
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def bundled_dataset(split: str = "train") -> str:
    """Path of one split of the bundled HH-RLHF sample, used when no dataset is named."""
    return str(BUNDLED_DIR / f"{split}.jsonl")


def load_rows(source: str, *, split: str = "train", config_name: str | None = None) -> datasets.Dataset:
    """Rows of a JSONL / JSON / CSV / Parquet file, a saved dataset folder, the bundled sample (its name,
    `hh-rlhf-harmless`, reads `split`), or a Hub dataset split."""
    path = BUNDLED_DIR if source == BUNDLED_NAME else Path(source).expanduser()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # parse errors become one UserError sentence
    try:
        if path.is_file():
            return _load_file(path)
        if path.is_dir():
            return _load_folder(path, split)
        if looks_like_path(source) or path.suffix.lower() in FILE_BUILDERS:
            raise UserError(f"dataset file '{source}' does not exist.")
        return _load_hub(source, split, config_name)
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


def _load_file(path: Path) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"cannot read '{path}': smolalign reads .jsonl, .json, .csv and .parquet files, not '{path.suffix}'."
        )
    if path.stat().st_size == 0:
        raise UserError(f"dataset file '{path}' is empty.")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in several exception types
        reason = first_line(error)
        raise UserError(f"cannot parse '{path}' as {path.suffix[1:].upper()}: {reason}") from None


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if split not in loaded:
            raise UserError(f"dataset '{path}' has no split '{split}'; it has {', '.join(loaded)}.")
        return loaded[split]
    candidate = path / f"{split}.jsonl"
    if candidate.is_file():
        return _load_file(candidate)
    raise UserError(f"'{path}' is a folder without a saved dataset or a '{split}.jsonl' file.")


def _load_hub(name: str, split: str, config_name: str | None) -> datasets.Dataset:
    prefer_local_cache()
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise UserError(f"dataset '{name}' has no split '{split}'; {first_line(error)}") from None
        raise UserError(f"cannot load dataset '{name}' from the Hub: {first_line(error)}") from None
    except Exception as error:  # connection errors, missing repos, offline mode
        raise UserError(
            f"cannot load dataset '{name}': no such local file, and {hub_failure_reason(error)}; check the name "
            "and the network, or omit 'dataset' for the bundled HH-RLHF pairs."
        ) from None
