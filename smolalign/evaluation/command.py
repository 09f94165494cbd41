"""`smolalign eval`: did the alignment work? Preference accuracy, drift from the reference, generations
side by side, and a judge's win rate, on held-out pairs.

Writes into the output folder: `eval.json` (the summary), `eval_pairs.jsonl` (per pair, in dataset
order), and with `--generate N` `generations.jsonl` (policy and reference answers to N prompts, with
the judge's verdicts when a judge is given).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import torch
from peft import PeftModel

from smolalign.config.commands import EvalConfig
from smolalign.config.train import TrainConfig
from smolalign.core.heldout import labelled_summary, preference_summary, write_pair_rows
from smolalign.core.layouts import choose_layout
from smolalign.core.logprobs import SequenceScorer
from smolalign.core.reference import ReferenceCache, pair_key
from smolalign.core.scoring import PairScoring, ScorerView
from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.errors import UserError
from smolalign.evaluation.drift import generate_with_drift, score_with_drift
from smolalign.evaluation.generation import generate_answers
from smolalign.models.loading import (
    load_for_scoring,
    load_tokenizer,
    model_source,
    resolve_device,
)
from smolalign.models.memory import freed_memory_kept
from smolalign.models.packed import packed_linears
from smolalign.models.precision import resolve_dtype
from smolalign.run_folder import EvalFolder, RunFolder

log = logging.getLogger("smolalign")

EVAL_PAIRS_PER_FORWARD = 8  # the default token budget of a forward pass is this many pairs of max_length tokens


def default_output_dir(model: str) -> Path:
    """`RUN/eval` for a run's `RUN/final` model (where `smolalign compare` looks), else `./eval`."""
    run = RunFolder.of_final(model)
    return run.eval.path if run else Path("eval")


def run_config_of(model: str) -> dict:
    """The settings of the run whose `RUN/final` `model` is (its config.yaml), else nothing."""
    run = RunFolder.of_final(model)
    return run.read_config() if run else {}


def with_run_settings(config: EvalConfig) -> EvalConfig:
    """`config` with its unset run settings (the fields marked `from_run`: beta, lengths, chat template,
    head chunk) taken from the run whose final/ is evaluated, else from training's defaults, so a run's
    final/ is scored as it was trained."""
    run = run_config_of(config.model)
    unset = [f.name for f in dataclasses.fields(config)
             if f.metadata.get("from_run") and getattr(config, f.name) is None]
    config = dataclasses.replace(config, **{key: run.get(key, getattr(TrainConfig, key)) for key in unset})
    config.validate()  # a flag's value against the run's (max_prompt_length below the run's max_length)
    return config


def starting_model_of_run(model: str) -> str | None:
    """The model a full fine-tuning run started from (its `ref_model`, else its `model`), when `model` is
    that run's `RUN/final`: the run's own reference. None for anything else, LoRA adapters included
    (their reference is the base model with the adapter switched off) and reward models."""
    config = run_config_of(model)
    if not config or (Path(model) / "adapter_config.json").exists() or config.get("algorithm") == "reward":
        return None
    return config.get("ref_model") or model_source(config.get("model"))


def run_eval(config: EvalConfig) -> dict:
    """Score every pair with the model (and the reference), measure drift, generate and judge."""
    device = resolve_device(config.device)
    with contextlib.ExitStack() as packed:  # no weight changes in an eval: packed once (models/packed.py)
        packed.enter_context(freed_memory_kept(device))
        return _run_eval(with_run_settings(config), device, packed)


def _run_eval(config: EvalConfig, device: torch.device, packed: contextlib.ExitStack) -> dict:
    ref_model = config.ref_model or starting_model_of_run(config.model)
    has_reference = bool(ref_model) or is_adapter(config.model)
    check_judge_settings(config, has_reference=has_reference)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model, chat_template=config.chat_template)
    read = read_pairs(config.dataset, split=config.split, system_prompt=config.system_prompt,
                      limit=config.max_pairs, columns=config.dataset_columns)
    labelled = read.data_format.kind == "unpaired"  # KTO's rows: scored by the sign of their implicit reward
    pairs = tokenize_and_fit(read, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                             use="labelled" if labelled else "pairs", algorithm="smolalign eval")
    if labelled and not has_reference:
        raise UserError(f"'{config.dataset}' holds unpaired rows, scored by the sign of the implicit reward "
                        "log pi/pi_ref: give --ref_model (or evaluate a run's final/ or a LoRA adapter).")

    model = load_for_scoring(config.model, dtype=dtype, device=device, tokenizer=tokenizer)
    packed.enter_context(packed_linears(model))
    scoring = PairScoring(choose_layout(config.batch_layout, model), tokenizer.pad_token_id, device,
                          max_tokens=config.max_tokens_per_forward or EVAL_PAIRS_PER_FORWARD * config.max_length)
    policy_view = ScorerView(SequenceScorer(model, config.logprob_chunk_size))

    # The reference: --ref_model, the model a run's final/ started from, or the base model of a LoRA
    # adapter (the adapter switched off).
    reference_model, reference_context = None, contextlib.nullcontext
    if ref_model:
        if not config.ref_model:
            log.info("reference: %s, the model this run started from (--ref_model names another)", ref_model)
        reference_model = load_for_scoring(ref_model, dtype=dtype, device=device, tokenizer=tokenizer)
        packed.enter_context(packed_linears(reference_model))
    elif isinstance(model, PeftModel):
        log.info("reference: the adapter's base model (adapters disabled)")
        reference_model, reference_context = model, model.disable_adapter

    reference_view = reference = None
    if reference_model is None:  # no KL without a reference; the policy's log-probs of the chosen answers are known
        policy = scoring.logps(policy_view, pairs, desc="scoring policy")
        summary = preference_summary(policy, None, beta=config.beta)
        summary["perplexity/chosen"] = math.exp(-policy.chosen.sum().item() / policy.chosen_tokens.sum().item())
    else:
        reference_view = ScorerView(SequenceScorer(reference_model, config.logprob_chunk_size), reference_context)
        scored = score_with_drift(policy_view, reference_view, pairs, name="chosen", scoring=scoring)
        policy = scored.policy
        # The reference log-probs that training runs share: values cached by training are the ones used (so
        # eval's margins are training's), those not cached yet are added.
        row_of = {pair_key(pair): row for row, pair in enumerate(pairs)}
        cached = ReferenceCache(reference_model).fill(
            [pairs], lambda missing: scored.reference.take([row_of[pair_key(p)] for chunk in missing for p in chunk]))
        reference = cached.of_pairs(pairs)
        summarize = labelled_summary if labelled else preference_summary
        summary = summarize(policy, reference, beta=config.beta)
        summary.update(scored.statistics)

    folder = EvalFolder(Path(config.output_dir) if config.output_dir else default_output_dir(config.model))
    folder.path.mkdir(parents=True, exist_ok=True)
    if config.generate:
        shown = pairs[: config.generate]
        prompts = [p.prompt_ids for p in shown]
        sampling = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
                    "temperature": config.temperature, "top_p": config.top_p, "seed": config.seed,
                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "device": device,
                    "batch_size": config.generation_batch_size}
        if reference_view is None:
            policy_answers = generate_answers(model, prompts, desc="generating (policy)", **sampling)
            reference_answers = None
        else:
            generated = generate_with_drift(policy_view, reference_view, prompts, **sampling)
            policy_answers, reference_answers = generated.policy_answers, generated.reference_answers
            summary.update(generated.statistics)
        rows = generation_rows(shown, read, tokenizer, policy_answers, reference_answers)
        summary["generation/policy_mean_tokens"] = sum(r["policy_tokens"] for r in rows) / len(rows)
        if reference_answers is not None:
            summary["generation/reference_mean_tokens"] = sum(r["reference_tokens"] for r in rows) / len(rows)
    write_results(folder, summary, rows if config.generate else None)
    write_pair_rows(folder.pairs_file, pairs, policy, reference)
    if config.judge or config.judge_url:  # after the results are safe on disk: an endpoint may give up
        summary.update(judge_generations(build_judge_from_settings(config, device), rows))
        write_results(folder, summary, rows)
    return summary


def generation_rows(pairs, read, tokenizer, policy_answers, reference_answers) -> list[dict]:
    """One row per prompt: the prompt as the dataset gave it, and both answers as text with their lengths."""
    prompts = {pair.index: pair.prompt for pair in read.pairs}
    rows = []
    for i, pair in enumerate(pairs):
        row = {
            "index": pair.index,
            "prompt": prompts[pair.index],
            "policy": tokenizer.decode(policy_answers[i], skip_special_tokens=True).strip(),
            "policy_tokens": len(policy_answers[i]),
        }
        if reference_answers is not None:
            row["reference"] = tokenizer.decode(reference_answers[i], skip_special_tokens=True).strip()
            row["reference_tokens"] = len(reference_answers[i])
        rows.append(row)
    return rows


def write_results(folder: EvalFolder, summary: dict, rows: list[dict] | None) -> None:
    folder.write_summary(summary)
    if rows is not None:
        folder.write_generations(rows)


def is_adapter(model: str) -> bool:
    return (Path(model_source(model)) / "adapter_config.json").exists()


def check_judge_settings(config: EvalConfig, *, has_reference: bool) -> None:
    """A judge needs generations and a reference to compare with: checked before any work is done."""
    if not (config.judge or config.judge_url):
        return
    from smolalign.evaluation.judge import check_judge_options

    check_judge_options(reward_model=config.judge, url=config.judge_url, model=config.judge_model)
    if not config.generate:
        raise UserError("a judge compares generated answers: add --generate N (e.g. --generate 32).")
    if not has_reference:
        raise UserError("a judge compares the policy with its reference: give --ref_model (or a LoRA adapter).")


def build_judge_from_settings(config: EvalConfig, device: torch.device):
    from smolalign.evaluation.judge import build_judge

    return build_judge(reward_model=config.judge, url=config.judge_url, model=config.judge_model,
                       api_key_env=config.judge_api_key_env, device=device)


def judge_generations(judge, rows: list[dict]) -> dict:
    """Verdicts of `judge` on each row (added to the rows) and the win rate of the policy."""
    from smolalign.evaluation.judge import win_rate_summary

    verdicts = judge.judge([r["prompt"] for r in rows], [r["policy"] for r in rows], [r["reference"] for r in rows])
    for row, verdict in zip(rows, verdicts, strict=True):
        row["verdict"] = verdict.winner
        row["policy_score"], row["reference_score"] = verdict.policy_score, verdict.reference_score
    return win_rate_summary(verdicts, judge.name)
