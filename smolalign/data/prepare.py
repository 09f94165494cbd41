"""The data stage of a run: source -> pairs -> token ids -> fitted pairs, train and held-out."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from smolalign.data.formats import (
    FORMAT_DESCRIPTIONS,
    PreferencePair,
    RowProblem,
    UnusableRow,
    detect_format,
    missing_columns_message,
    to_pair,
)
from smolalign.data.sources import bundled_dataset, load_rows
from smolalign.data.tokenize import TokenizedPair, fit_to_length, tokenize_pairs
from smolalign.errors import UserError

log = logging.getLogger("smolalign")


@dataclass
class ReadResult:
    """Pairs of one source, the format they were read as, and the rows left out."""

    source: str
    data_format: str
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
) -> ReadResult:
    """Load a dataset and normalise its rows; raises UserError when no row is usable (unless allow_empty)."""
    rows = load_rows(source, split=split, config_name=config_name)
    if len(rows) == 0:
        raise UserError(f"dataset '{source}' has no rows.")
    data_format = detect_format(rows.column_names, rows[0])
    if data_format is None:
        raise UserError(missing_columns_message(source, rows.column_names))
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
        raise UserError(f"dataset '{source}' has no usable pairs ({first}).")
    return ReadResult(source, data_format, len(rows), pairs, problems)


def tokenize_and_fit(
    result: ReadResult,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None,
    needs_rejected: bool = True,
) -> list[TokenizedPair]:
    """Token ids of every pair, fitted to max_length; logs how many were truncated and dropped."""
    if needs_rejected and any(p.rejected is None for p in result.pairs):
        raise UserError(
            f"dataset '{result.source}' holds {FORMAT_DESCRIPTIONS[result.data_format]} without rejected answers; "
            "preference algorithms need chosen and rejected answers (use algorithm: sft for such data)."
        )
    fitted, dropped, no_prompt, truncated = [], 0, 0, 0
    for pair in tokenize_pairs(result.pairs, tokenizer):
        fit = fit_to_length(pair, max_length=max_length, max_prompt_length=max_prompt_length)
        if fit is None:
            no_prompt += not pair.prompt_ids  # the prompt's tokens merged into the answer's
            dropped += 1
            continue
        truncated += fit.truncated
        fitted.append(fit)
    log.info(
        "%s: %d rows read as %s; %d pairs kept, %d truncated to max_length=%d, %d dropped (%d without a prompt "
        "token), %d rows unusable",
        result.source, result.num_rows, FORMAT_DESCRIPTIONS[result.data_format], len(fitted), truncated,
        max_length, dropped, no_prompt, len(result.problems),
    )
    for problem in result.problems[:5]:
        log.info("  left out %s", problem)
    if not fitted:
        raise UserError(
            f"every pair of '{result.source}' was dropped: empty prompts, or no room for an answer within "
            f"max_length={max_length}."
        )
    return fitted


def prepare_data(config, tokenizer: PreTrainedTokenizerBase, *, needs_rejected: bool) -> PreparedData:
    """Training and held-out pairs as the config asks (eval_dataset, test_split_size or neither)."""
    fit = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    source = config.dataset or bundled_dataset("train")
    train_limit = config.max_train_pairs if not config.test_split_size else None  # read no more than needed
    read = read_pairs(source, split=config.dataset_split, config_name=config.dataset_config,
                      system_prompt=config.system_prompt, limit=train_limit)
    train = tokenize_and_fit(read, tokenizer, needs_rejected=needs_rejected, **fit)

    held_out: list[TokenizedPair] = []
    if config.eval_dataset:
        eval_read = read_pairs(
            config.eval_dataset,
            split=config.eval_split,
            config_name=config.eval_dataset_config or config.dataset_config,
            system_prompt=config.system_prompt,
            limit=config.max_eval_pairs,
        )
        held_out = tokenize_and_fit(eval_read, tokenizer, needs_rejected=needs_rejected, **fit)
    elif config.test_split_size > 0:
        count = int(config.test_split_size) if config.test_split_size >= 1 else round(len(train) * config.test_split_size)
        if not 1 <= count < len(train):
            raise UserError(
                f"test_split_size={config.test_split_size} leaves no pairs on one side of the split of {len(train)} pairs."
            )
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        held = set(order[:count])
        held_out = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]

    if config.max_train_pairs is not None:
        train = train[: config.max_train_pairs]
    if config.max_eval_pairs is not None:
        held_out = held_out[: config.max_eval_pairs]
    return PreparedData(train=train, eval=held_out)
