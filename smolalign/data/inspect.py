"""`smolalign data inspect`: what a dataset looks like and what is wrong with it, before training on it."""

from __future__ import annotations

from smolalign.config.commands import InspectConfig
from smolalign.data.formats import KIND_DESCRIPTIONS
from smolalign.data.prepare import ReadResult, read_pairs
from smolalign.data.tokenize import fit_to_length, tokenize_pairs
from smolalign.models.loading import load_tokenizer

PERCENTILES = (50, 90, 99, 100)
SHOWN_PROBLEMS = 20


def inspect_dataset(config: InspectConfig) -> str:
    """A plain-text report: format, counts, token-length percentiles, truncation, problems by row."""
    read = read_pairs(config.dataset, split=config.split, system_prompt=config.system_prompt, allow_empty=True,
                      columns=config.dataset_columns)
    lines = [
        f"dataset:  {config.dataset}" + (f" (split {config.split})" if config.split != "train" else ""),
        f"format:   {read.data_format.description}",
        *_columns_line(read),
        f"rows:     {read.num_rows}, usable {_usable(read)}, unusable rows: {len(read.problems)}",
        *_use_line(read),
    ]
    if read.pairs:
        tokenizer = load_tokenizer(config.model, chat_template=config.chat_template)
        tokenized = tokenize_pairs(read.pairs, tokenizer)
        lengths = {
            "prompt": [len(p.prompt_ids) for p in tokenized],
            "chosen": [len(p.chosen_ids) for p in tokenized],
            "rejected": [len(p.rejected_ids) for p in tokenized if p.rejected_ids is not None],
            "longest sequence": [p.longest_sequence for p in tokenized],
        }
        name = config.model or "embedded SmolLM2-135M-Instruct"
        header = "".join(f"{'p' + str(q) if q < 100 else 'max':>8}" for q in PERCENTILES)
        lines += ["", f"token lengths ({name} tokenizer):", f"  {'':<18}{header}"]
        for part, values in lengths.items():
            if values:
                lines.append(f"  {part:<18}" + "".join(f"{_percentile(values, q):>8}" for q in PERCENTILES))
        fitted = [fit_to_length(p, max_length=config.max_length, max_prompt_length=config.max_prompt_length)
                  for p in tokenized]
        truncated = sum(1 for f in fitted if f is not None and f.truncated)
        dropped = sum(1 for f in fitted if f is None)
        limits = f"max_length={config.max_length}" + (
            f", max_prompt_length={config.max_prompt_length}" if config.max_prompt_length else ""
        )
        lines += ["", f"with {limits}: {truncated} pairs would be truncated, {dropped} dropped (cannot fit)"]
    if read.problems:
        lines += ["", "problems:"] + [f"  {problem}" for problem in read.problems[:SHOWN_PROBLEMS]]
        if len(read.problems) > SHOWN_PROBLEMS:
            lines.append(f"  … and {len(read.problems) - SHOWN_PROBLEMS} more")
    else:
        lines += ["", "problems: none"]
    return "\n".join(lines)


def _columns_line(read: ReadResult) -> list[str]:
    renamed = read.data_format.columns.renamed()
    return ["columns:  " + ", ".join(f"{role} <- {column}" for role, column in renamed.items())] if renamed else []


def _usable(read: ReadResult) -> str:
    if read.data_format.kind != "unpaired":
        return f"{'pairs' if read.data_format.kind == 'pairs' else 'rows'}: {len(read.pairs)}"
    desirable = sum(1 for pair in read.pairs if pair.label)
    return f"rows: {len(read.pairs)} ({desirable} desirable, {len(read.pairs) - desirable} undesirable)"


def _use_line(read: ReadResult) -> list[str]:
    """What the data is for, where that is not the preference algorithms."""
    kind = read.data_format.kind
    if kind == "unpaired":
        return [f"use:      {KIND_DESCRIPTIONS[kind]}: algorithm kto, or sft (desirable answers only); "
                "DPO, ORPO and SimPO need pairs"]
    if kind == "sft":
        return ["use:      one answer per prompt: algorithm sft; preference algorithms need pairs"]
    return []


def _percentile(values: list[int], q: int) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
