"""`smolalign eval`: preference accuracy of a model on held-out pairs, and per-pair log-probs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peft import PeftModel

from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.evaluate import format_summary_table, preference_summary, score_pairs, write_pair_rows
from smolalign.logprobs import SequenceScorer, choose_layout
from smolalign.models import load_for_scoring, load_tokenizer, resolve_device, resolve_dtype

log = logging.getLogger("smolalign")


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
        reference = score_pairs(SequenceScorer(ref_model), pairs, desc="scoring reference", **score)
    elif isinstance(model, PeftModel):
        log.info("reference: the adapter's base model (adapters disabled)")
        with model.disable_adapter():
            reference = score_pairs(SequenceScorer(model), pairs, desc="scoring reference", **score)

    summary = preference_summary(policy, reference, beta=args.beta)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    write_pair_rows(output_dir / "eval_pairs.jsonl", pairs, policy, reference)
    print(f"{args.model} on {args.dataset} ({summary['pairs']} pairs):\n{format_summary_table(summary)}")
    print(f"wrote {output_dir / 'eval.json'} and {output_dir / 'eval_pairs.jsonl'}")
    return summary
