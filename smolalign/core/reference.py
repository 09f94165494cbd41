"""Reference log-probs for objectives that need them (the DPO family).

Sources, all giving the same numbers: the policy with its LoRA adapters disabled (no second copy of
the model), a separate frozen model (`ref_model`), or values computed once before training and kept
in a disk cache. The cache is keyed by everything that changes the numbers: the reference weights (a
hash of every tensor, with its dtype), the precision the reference runs in (autocast or not, and to
which dtype), and each pair's token ids. Batch layout and chunk sizes change no number beyond float
noise, so later runs and `smolalign eval` reuse the cache whatever theirs; a run fills it in the chunks its
steps use, since under bf16 that noise is visible. Full fine-tuning without a
`ref_model` precomputes with the initial policy itself, so the reference never costs a second copy of
the model in memory. Concurrent runs share the cache safely: writers take turns under a file lock and
merge, and a file is replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from smolalign.core.layouts import Batch
from smolalign.core.logprobs import PairLogps, SequenceScorer
from smolalign.core.scoring import PairScoring, ScorerView
from smolalign.data.tokenize import TokenizedPair
from smolalign.locks import exclusive_file_lock
from smolalign.models.embedded import cache_root
from smolalign.models.loading import frozen_copy, load_frozen

log = logging.getLogger("smolalign")


class Reference(Protocol):
    """Where a step's reference log-probs come from: a model run on the step's batch (a `ScorerView`), or
    values precomputed per pair (`PrecomputedReference`)."""

    def logps(self, batch: Batch, pairs: list[TokenizedPair]) -> PairLogps:
        """Reference log-probs of `pairs`, which `batch` lays out."""
        ...


def adapter_disabled_reference(policy_scorer: nn.Module, peft_model: PeftModel) -> ScorerView:
    """LoRA: the reference is the base model, i.e. the policy with adapters switched off."""
    return ScorerView(policy_scorer, context=peft_model.disable_adapter)


def model_reference(model: nn.Module, chunk_size: int) -> ScorerView:
    """A separate frozen model as the reference."""
    return ScorerView(SequenceScorer(model, chunk_size=chunk_size))


def precomputes_reference(config) -> bool:
    """Whether reference log-probs are computed once before training (`precompute_ref_log_probs`; by default
    yes, unless a separate `ref_model` is given)."""
    return config.precompute_ref_log_probs if config.precompute_ref_log_probs is not None else not config.ref_model


def reference_source(
    config, *, policy: nn.Module, policy_scorer: nn.Module, tokenizer, dtype: torch.dtype, device: torch.device,
) -> tuple[ScorerView, nn.Module]:
    """Where reference log-probs come from, and the module whose weights identify them in the cache.

    `ref_model` if set; else the initial policy: under LoRA the policy with adapters disabled, for full
    fine-tuning the policy itself when precomputing (before any step), else a frozen copy of it.
    """
    if config.ref_model:
        model = load_frozen(config.ref_model, dtype=dtype, device=device, tokenizer=tokenizer,
                            trust_remote_code=config.trust_remote_code)
        return model_reference(model, config.logprob_chunk_size), model
    if isinstance(policy, PeftModel):
        return adapter_disabled_reference(policy_scorer, policy), policy
    if precomputes_reference(config):
        return ScorerView(policy_scorer), policy
    model = frozen_copy(policy)
    return model_reference(model, config.logprob_chunk_size), model


# What the cache keeps per pair: the answers' log-prob sums, and their sums over the shared length (LD-DPO; NaN in
# files written before smolalign kept them).
CACHED = ("chosen", "rejected", "chosen_shared", "rejected_shared")
Cached = tuple[float, float, float, float]


class PrecomputedReference:
    """Reference log-probs looked up by pair, from `ReferenceCache.fill`."""

    def __init__(self, by_pair: dict[int, Cached]):
        self.by_pair = by_pair  # pair_key -> the values of CACHED

    def logps(self, batch: Batch, pairs: list[TokenizedPair]) -> PairLogps:
        return self.of_pairs(pairs, batch.input_ids.device)

    def of_pairs(self, pairs: list[TokenizedPair], device: torch.device | str = "cpu") -> PairLogps:
        """The cached answer sums of `pairs` with their answer token counts (no prompt values)."""
        values = torch.tensor([self.by_pair[pair_key(p)] for p in pairs], dtype=torch.float32, device=device)
        counts = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids or ())] for p in pairs], dtype=torch.float32,
                              device=device).reshape(-1, 2)
        zeros = torch.zeros(len(pairs), device=device)
        return PairLogps(values[:, 0], values[:, 1], zeros, counts[:, 0], counts[:, 1], zeros,
                         chosen_shared=values[:, 2], rejected_shared=values[:, 3])


def pair_key(pair: TokenizedPair) -> int:
    """A 63-bit fingerprint of a pair's token ids (what the reference log-probs depend on)."""
    digest = hashlib.blake2b(digest_size=8)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids or []):
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def weights_key(model: nn.Module) -> str:
    """Hash of every reference weight. Under LoRA the adapter weights are left out (the reference has them
    disabled) and PEFT's wrapper names are undone, so a LoRA run shares the cache of its base model."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace("base_model.model.", "").replace(".base_layer.", ".").encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


# Reference log-probs of the demo's bundled pairs under the embedded model, shipped so that a fresh machine
# skips that precompute. Same file names as the cache; found only for the same weights, precision and ids.
# `smolalign bench` sets IGNORE_SHIPPED in its runs, so that every run pays for its whole reference pass.
SHIPPED_CACHE = Path(__file__).resolve().parents[1] / "bundled" / "reference-logps"
IGNORE_SHIPPED = "SMOLALIGN_IGNORE_SHIPPED_REFERENCE"


def _read_values(path: Path | None) -> dict[int, Cached]:
    if path is None or not path.exists():
        return {}
    tensors = load_file(path)
    nan = torch.full_like(tensors["chosen"], math.nan)
    columns = [tensors.get(name, nan).tolist() for name in CACHED]
    return {int(key): tuple(values) for key, *values in zip(tensors["pair_keys"].tolist(), *columns, strict=True)}


def precision_key(model: nn.Module) -> str:
    """The precision a reference pass runs in here: autocast to a dtype, or none (then the weights' own
    dtype, which `weights_key` already holds, decides)."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return f"autocast-{str(torch.get_autocast_dtype(device_type)).removeprefix('torch.')}"
    return "no-autocast"


class ReferenceCache:
    """Per-pair reference log-prob sums of one reference model in one precision, in a safetensors file.

    Create it where the reference pass will run (inside the same autocast context, if any): the file
    name holds the weights' hash (`weights_hash`, if already computed: hashing takes about a second on
    SmolLM2-135M) and that precision.
    """

    def __init__(self, reference_weights: nn.Module, folder: Path | None = None, *, weights_hash: str | None = None):
        folder = folder or Path(os.environ.get("SMOLALIGN_REFERENCE_CACHE", cache_root() / "reference-logps"))
        name = f"{weights_hash or weights_key(reference_weights)}-{precision_key(reference_weights)}.safetensors"
        self.path = folder / name
        # Read-only values that came with the package, if any (none where IGNORE_SHIPPED is set).
        self.shipped = None if os.environ.get(IGNORE_SHIPPED) else SHIPPED_CACHE / name

    def load(self) -> dict[int, Cached]:
        """Every cached pair: those shipped with the package, then those of this machine's cache."""
        return {**_read_values(self.shipped), **_read_values(self.path)}

    def save(self, values: dict[int, Cached]) -> None:
        """Add `values` to the file; pairs another run saved meanwhile are kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_file_lock(self.path.with_suffix(".lock")):
            values = {**_read_values(self.path), **values}  # this machine's file; shipped values stay where they are
            keys = sorted(values)
            handle, staging = tempfile.mkstemp(prefix=self.path.stem + ".", suffix=".partial", dir=self.path.parent)
            os.close(handle)
            try:
                save_file({"pair_keys": torch.tensor(keys, dtype=torch.int64),
                           **{name: torch.tensor([values[k][i] for k in keys], dtype=torch.float32)
                              for i, name in enumerate(CACHED)}}, staging)
                os.replace(staging, self.path)  # atomic: readers see the old or the new file, never half of one
            finally:
                Path(staging).unlink(missing_ok=True)

    def fill(self, chunks: list[list[TokenizedPair]], score: Callable[[list[list[TokenizedPair]]], PairLogps], *,
             shared: bool = False) -> PrecomputedReference:
        """Reference log-probs for the pairs of `chunks`: cached ones are reused, the others scored by `score`
        in their chunks (less the pairs cached or scored in an earlier chunk) and added to the cache (with
        `shared`, also those cached without their shared-length sums)."""
        shipped = _read_values(self.shipped)
        values = {**shipped, **_read_values(self.path)}
        seen: set[int] = set()
        missing: list[int] = []
        to_score: list[list[TokenizedPair]] = []
        for chunk in chunks:
            kept = []
            for pair in chunk:
                key = pair_key(pair)
                if key in seen:
                    continue
                seen.add(key)
                if key not in values or (shared and math.isnan(values[key][2])):
                    missing.append(key)
                    kept.append(pair)
            if kept:
                to_score.append(kept)
        log.info("reference log-probs: %d of %d pairs cached (%d shipped with smolalign, the others in %s), %d to compute",
                 len(seen) - len(missing), len(seen), len(seen & shipped.keys()), self.path.parent, len(missing))
        if missing:
            scored = score(to_score)
            nan = [math.nan] * len(missing)  # a scorer without the shared-length sums
            columns = [getattr(scored, name).tolist() if getattr(scored, name) is not None else nan for name in CACHED]
            new = {key: tuple(row) for key, *row in zip(missing, *columns, strict=True)}
            self.save(new)
            values.update(new)
        return PrecomputedReference(values)


def precompute_reference(
    reference: ScorerView,
    reference_weights: nn.Module,
    chunks: list[list[TokenizedPair]],
    scoring: PairScoring,
    *,
    weights_hash: str | None = None,
    desc: str = "reference log-probs",
    shared: bool = False,
) -> PrecomputedReference:
    """Reference log-probs of the pairs of `chunks`, from the cache of `reference_weights` or scored once now (with
    `shared`, also their sums over the shared length, for LD-DPO). Give it the chunks the steps will score the
    policy in: under bf16 a pair's log-probs move with the rows padded beside it (by up to a few tenths on long
    answers), and only the same chunks give the same numbers, a DPO loss of exactly log 2 at step 1.
    `weights_hash`: `weights_key(reference_weights)`, where the caller has it already."""
    return ReferenceCache(reference_weights, weights_hash=weights_hash).fill(
        chunks, lambda missing: scoring.chunk_logps(reference, missing, desc=desc), shared=shared
    )
