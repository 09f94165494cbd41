"""`smolalign data inspect`: what a dataset looks like and what is wrong with it, before training on it."""

from __future__ import annotations

from smolalign.config.commands import InspectConfig
from smolalign.data.formats import FORMAT_DESCRIPTIONS
from smolalign.data.prepare import read_pairs
from smolalign.data.tokenize import fit_to_length, tokenize_pairs
from smolalign.models.loading import load_tokenizer

PERCENTILES = (50, 90, 99, 100)
SHOWN_PROBLEMS = 20


def inspect_dataset(config: InspectConfig) -> str:
    """A plain-text report: format, counts, token-length percentiles, truncation, problems by row."""
    read = read_pairs(config.dataset, split=config.split, system_prompt=config.system_prompt, allow_empty=True)
    lines = [
        f"dataset:  {config.dataset}" + (f" (split {config.split})" if config.split != "train" else ""),
        f"format:   {FORMAT_DESCRIPTIONS[read.data_format]}",
        f"rows:     {read.num_rows}, usable pairs: {len(read.pairs)}, unusable rows: {len(read.problems)}",
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


def _percentile(values: list[int], q: int) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
