"""`smolalign eval`: preference accuracy of a model on held-out pairs, and per-pair log-probs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel

from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.data.tokenize import TokenizedPair
from smolalign.evaluate import format_summary_table, preference_summary, score_pairs, write_pair_rows
from smolalign.logprobs import PairLogps, SequenceScorer, choose_layout
from smolalign.models import load_for_scoring, load_tokenizer, resolve_device, resolve_dtype
from smolalign.reference import ReferenceCache, pair_key, weights_key

log = logging.getLogger("smolalign")


def cached_reference_logps(weights, scorer, pairs: list[TokenizedPair], score: dict) -> PairLogps:
    """Reference sums per pair, reusing (and filling) the cache that training runs share."""
    values = ReferenceCache(weights_key(weights)).fill(
        pairs, lambda missing: score_pairs(scorer, missing, desc="scoring reference", **score)
    )
    sums = torch.tensor([values.by_pair[pair_key(p)] for p in pairs], dtype=torch.float32)
    counts = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=torch.float32)
    return PairLogps(sums[:, 0], sums[:, 1], torch.zeros(len(pairs)), counts[:, 0], counts[:, 1],
                     torch.zeros(len(pairs)))


def run_eval(args) -> dict:
    """Score every pair with the model (and the reference), write eval.json and eval_pairs.jsonl."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
    read = read_pairs(args.dataset, split=args.split, system_prompt=args.system_prompt, limit=args.max_pairs)
    pairs = tokenize_and_fit(read, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)

    model = load_for_scoring(args.model, dtype=dtype, device=device, tokenizer=tokenizer)
    layout = choose_layout(args.batch_layout, model)
    score = {"layout": layout, "batch_size": args.batch_size, "pad_token_id": tokenizer.pad_token_id, "device": device}
    policy = score_pairs(SequenceScorer(model), pairs, desc="scoring policy", **score)

    reference = None
    if args.ref_model:
        ref_model = load_for_scoring(args.ref_model, dtype=dtype, device=device, tokenizer=tokenizer)
        reference = cached_reference_logps(ref_model, SequenceScorer(ref_model), pairs, score)
    elif isinstance(model, PeftModel):
        log.info("reference: the adapter's base model (adapters disabled)")
        with model.disable_adapter():
            reference = cached_reference_logps(model, SequenceScorer(model), pairs, score)

    summary = preference_summary(policy, reference, beta=args.beta)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    write_pair_rows(output_dir / "eval_pairs.jsonl", pairs, policy, reference)
    print(f"{args.model} on {args.dataset} ({summary['pairs']} pairs):\n{format_summary_table(summary)}")
    print(f"wrote {output_dir / 'eval.json'} and {output_dir / 'eval_pairs.jsonl'}")
    return summary
