"""Write the reference log-probs of the demo's pairs into smolalign/bundled/reference-logps/.

The demo's DPO run (recipes/demo.yaml) needs, before its first step, the log-probs of its train and
held-out pairs under the embedded model: fixed numbers for fixed weights, precision and token ids.
Shipped with the package, they spare every fresh machine that pass. Rerun this after changing the demo's
pairs, lengths or chat template (a run whose pairs are not in the file computes the missing ones itself).
Values already in the file stay: those of the `quality` recipe's pairs (320 train and 120 held-out at
max_length 256, the demo's earlier settings) serve `smolalign bench --quality`.

    .venv/bin/python scripts/ship_reference_logps.py [RECIPE]
"""

from __future__ import annotations

import os
import sys
import tempfile

from smolalign.core.reference import SHIPPED_CACHE


def main(recipe: str = "demo") -> None:
    os.environ["SMOLALIGN_REFERENCE_CACHE"] = str(SHIPPED_CACHE)  # read by ReferenceCache: write there
    from smolalign.config.train import load_config
    from smolalign.core.logprobs import SequenceScorer
    from smolalign.core.losses import OBJECTIVES
    from smolalign.data.prepare import prepare_data
    from smolalign.models.loading import load_tokenizer, resolve_device, resolve_precision
    from smolalign.training.setup import (
        build_plan,
        build_policy,
        build_reference,
        build_scoring,
        make_accelerator,
    )

    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(recipe, {"output_dir": scratch})
        objective = OBJECTIVES[config.algorithm]
        device = resolve_device(config.device)
        dtype, mixed_precision = resolve_precision(config.dtype, device, lora=config.lora is not None)
        accelerator = make_accelerator(config, device, mixed_precision, config.output_dir)
        tokenizer = load_tokenizer(config.model, chat_template=config.chat_template)
        data = prepare_data(config, tokenizer, use=objective.rows)
        policy, layout = build_policy(config, objective, tokenizer, dtype=dtype, device=accelerator.device)
        scoring = build_scoring(config, policy, layout, tokenizer, accelerator, mixed_precision)
        build_reference(config, objective, policy=policy, scorer=SequenceScorer(policy, config.logprob_chunk_size),
                        tokenizer=tokenizer, dtype=dtype, accelerator=accelerator, scoring=scoring,
                        plan=build_plan(config, data, accelerator.num_processes), data=data)
    for path in sorted(SHIPPED_CACHE.glob("*.lock")):
        path.unlink()  # the cache's write lock: not part of the package
    print("\n".join(str(path) for path in sorted(SHIPPED_CACHE.glob("*.safetensors"))))


if __name__ == "__main__":
    main(*sys.argv[1:])
