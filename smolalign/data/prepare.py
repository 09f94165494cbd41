"""The data stage of a run: sources -> rows an algorithm trains on -> token ids -> fitted pairs, train and held-out."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerBase

from smolalign.data.columns import map_columns
from smolalign.data.formats import (
    KIND_DESCRIPTIONS,
    PreferencePair,
    RowFormat,
    RowProblem,
    RowUse,
    detect_format,
    to_pair,
)
from smolalign.data.messages import UnusableRow
from smolalign.data.sources import bundled_dataset, load_mixture, load_rows
from smolalign.data.tokenize import TokenizedPair, fit_to_length, tokenize_pairs
from smolalign.data.unpaired import check_labels, unpair, with_kl_answers
from smolalign.errors import UserError

log = logging.getLogger("smolalign")

@dataclass
class ReadResult:
    """Rows of one source, the format they were read as, and the rows left out."""

    source: str
    data_format: RowFormat
    num_rows: int
    pairs: list[PreferencePair]
    problems: list[RowProblem] = field(default_factory=list)


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]


def read_pairs(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
    allow_empty: bool = False,
    columns: dict[str, str] | None = None,
) -> ReadResult:
    """Load a dataset and normalise its rows (`columns`: role -> column name, for columns named otherwise);
    raises UserError when no row is usable (unless allow_empty)."""
    rows = load_rows(source, split=split, config_name=config_name)
    return read_rows(rows, source, system_prompt=system_prompt, limit=limit, allow_empty=allow_empty,
                     columns=columns)


def read_rows(rows: datasets.Dataset, source: str, *, system_prompt: str | None = None, limit: int | None = None,
              allow_empty: bool = False, columns: dict[str, str] | None = None) -> ReadResult:
    """`read_pairs` for rows already loaded."""
    if len(rows) == 0:
        raise UserError(f"dataset '{source}' has no rows.")
    data_format = detect_format(map_columns(rows.column_names, columns, source=f"dataset '{source}'"), rows[0])
    if data_format is None:
        raise UserError(unrecognised_message(source, rows.column_names))
    pairs, problems = [], []
    for index, row in enumerate(rows):
        if limit is not None and len(pairs) >= limit:
            break
        try:
            pairs.append(to_pair(row, index, data_format, system_prompt=system_prompt))
        except UnusableRow as reason:
            problems.append(RowProblem(index, str(reason)))
    if not pairs and not allow_empty:
        first = "; ".join(str(p) for p in problems[:3])
        raise UserError(f"dataset '{source}' has no usable rows ({first}).")
    return ReadResult(source, data_format, len(rows), pairs, problems)


def unrecognised_message(source: str, columns: list[str]) -> str:
    return (
        f"dataset '{source}' has columns {columns}; smolalign needs 'chosen' and 'rejected' (with an optional "
        "'prompt' and 'system'), 'prompt' / 'completion' / 'label', or a 'messages' conversation column; name "
        "other columns with dataset_columns (e.g. {prompt: question, chosen: good, rejected: bad})."
    )


def rows_for(result: ReadResult, use: RowUse, algorithm: str) -> list[PreferencePair]:
    """The rows of `result` that an algorithm using `use` trains on, or a UserError saying why there are none."""
    kind = result.data_format.kind
    what = f"dataset '{result.source}' holds {KIND_DESCRIPTIONS[kind]} ({result.data_format.description})"
    if use == "pairs" and kind != "pairs":
        instead = ("kto (unpaired preferences) or sft (which keeps the desirable answers)" if kind == "unpaired"
                   else "sft")
        raise UserError(f"{what}; {algorithm} needs a chosen and a rejected answer per prompt: use algorithm "
                        f"{instead}.")
    if use == "labelled" and kind == "sft":
        raise UserError(f"{what}, which say nothing about which answers are good; {algorithm} needs labelled "
                        "answers (prompt / completion / label) or preference pairs.")
    if use == "labelled":
        return unpair(result.pairs)
    if use == "answers" and kind == "unpaired":
        desirable = [pair for pair in result.pairs if pair.label]
        log.info("%s: SFT imitates the %d desirable answers and leaves out the %d undesirable ones",
                 result.source, len(desirable), len(result.pairs) - len(desirable))
        if not desirable:
            raise UserError(f"{what}, and none is labelled desirable: there is nothing to imitate.")
        return desirable
    return result.pairs


def tokenize_and_fit(
    result: ReadResult,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None,
    use: RowUse = "pairs",
    algorithm: str = "dpo",
) -> list[TokenizedPair]:
    """Token ids of the rows an algorithm trains on, fitted to max_length; logs how many were truncated and
    dropped."""
    fitted, dropped, no_prompt, truncated = [], 0, 0, 0
    for pair in tokenize_pairs(rows_for(result, use, algorithm), tokenizer):
        fit = fit_to_length(pair, max_length=max_length, max_prompt_length=max_prompt_length)
        if fit is None:
            no_prompt += not pair.prompt_ids  # the prompt's tokens merged into the answer's
            dropped += 1
            continue
        truncated += fit.truncated
        fitted.append(fit)
    log.info(
        "%s: %d rows read as %s; %d kept, %d truncated to max_length=%d, %d dropped (%d without a prompt "
        "token), %d rows unusable",
        result.source, result.num_rows, result.data_format.description, len(fitted), truncated,
        max_length, dropped, no_prompt, len(result.problems),
    )
    for problem in result.problems[:5]:
        log.info("  left out %s", problem)
    if not fitted:
        raise UserError(
            f"every row of '{result.source}' was dropped: empty prompts, or no room for an answer within "
            f"max_length={max_length}."
        )
    return fitted


def prepare_data(config, tokenizer: PreTrainedTokenizerBase, *, use: RowUse) -> PreparedData:
    """Training and held-out rows as the config asks (eval_dataset, test_split_size or neither)."""
    fit = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "use": use,
           "algorithm": config.algorithm}
    train_limit = config.max_train_pairs if not config.test_split_size else None  # read no more than needed
    train: list[TokenizedPair] = []
    for read in _training_sources(config, train_limit):
        offset = max((p.index for p in train), default=-1) + 1  # row numbers stay unique across a mixture
        train += [dataclasses.replace(p, index=p.index + offset) for p in tokenize_and_fit(read, tokenizer, **fit)]

    held_out: list[TokenizedPair] = []
    if config.eval_dataset:
        eval_read = read_pairs(
            config.eval_dataset,
            split=config.eval_split,
            config_name=config.eval_dataset_config or config.dataset_config,
            system_prompt=config.system_prompt,
            limit=config.max_eval_pairs,
            columns=config.dataset_columns,
        )
        held_out = tokenize_and_fit(eval_read, tokenizer, **fit)
    elif config.test_split_size > 0:
        train, held_out = _split(train, config.test_split_size, config.seed)

    if config.max_train_pairs is not None:
        train = _first(train, config.max_train_pairs)
    if config.max_eval_pairs is not None:
        held_out = _first(held_out, config.max_eval_pairs)
    if use == "labelled":
        train, held_out = _labelled(config, train), _labelled(config, held_out, check=False)
    return PreparedData(train=train, eval=held_out)


def _first(rows: list[TokenizedPair], count: int) -> list[TokenizedPair]:
    """The rows of the first `count` source rows (both rows KTO makes of a pair count as one)."""
    kept = set(sorted({row.index for row in rows})[:count])
    return [row for row in rows if row.index in kept]


def _split(rows: list[TokenizedPair], size: float, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Training and held-out rows: a fraction (< 1) or number of the source rows, drawn with `seed`; the two rows
    KTO makes of one pair stay on the same side."""
    sources = sorted({row.index for row in rows})
    count = int(size) if size >= 1 else round(len(sources) * size)
    if not 1 <= count < len(sources):
        raise UserError(f"test_split_size={size} leaves no pairs on one side of the split of {len(sources)} pairs.")
    random.Random(seed).shuffle(sources)
    held = set(sources[:count])
    return [row for row in rows if row.index not in held], [row for row in rows if row.index in held]


def _labelled(config, rows: list[TokenizedPair], *, check: bool = True) -> list[TokenizedPair]:
    """KTO's rows, checked, with the mismatched answers of its KL estimate (loss_type kto)."""
    if not rows:
        return rows
    if check:
        check_labels(rows, config.dataset or "the training data", desirable_weight=config.desirable_weight,
                     undesirable_weight=config.undesirable_weight)
    if config.loss_type == "apo_zero_unpaired":
        return rows
    return with_kl_answers(rows, config.per_device_train_batch_size, config.max_length)


def _training_sources(config, limit: int | None) -> list[ReadResult]:
    """The training data: `dataset` (default: the bundled pairs), or every dataset of `dataset_mixture`."""
    common = {"system_prompt": config.system_prompt, "limit": limit}
    if not config.dataset_mixture:
        return [read_pairs(config.dataset or bundled_dataset("train"), split=config.dataset_split,
                           config_name=config.dataset_config, columns=config.dataset_columns, **common)]
    return [read_rows(rows, name, columns=source.dataset_columns or config.dataset_columns, **common)
            for (name, rows), source in zip(load_mixture(config.dataset_mixture, seed=config.seed),
                                            config.dataset_mixture, strict=True)]
