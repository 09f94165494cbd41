"""The run's deliverable: `final/`, loadable by plain transformers (or PEFT), with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from smolalign.config.algorithms import loss_types
from smolalign.config.choices import ALGORITHM_TITLES
from smolalign.config.train import TrainConfig
from smolalign.hub import looks_like_path
from smolalign.models.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME, WEIGHTS_NOTE, is_embedded
from smolalign.run_folder import RunFolder
from smolalign.stats import ACCURACY_METRICS, Proportion


def save_final_model(
    model, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, output_dir: Path, summary: dict[str, float]
) -> Path:
    """Write final/ atomically: a full model, a PEFT adapter, or (merge_lora) the merged full model."""
    run = RunFolder(output_dir)
    final, staging = run.final, run.final_staging
    shutil.rmtree(staging, ignore_errors=True)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter and config.merge_lora:
        model, is_adapter = model.merge_and_unload(), False
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    model_card(config, summary, is_adapter=is_adapter).save(staging / "README.md")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def result_rows(summary: dict[str, float]) -> list[str]:
    """Markdown rows of the final metrics; a held-out accuracy with its 95% interval and pair count."""
    held_out = {f"eval_{name}" for name in ACCURACY_METRICS}
    rows = []
    for name, value in summary.items():
        if not isinstance(value, float) or name.endswith(("_ci_low", "_ci_high")):
            continue
        shown = Proportion.read(summary, name, n_key="eval_pairs") if name in held_out else f"{value:.4f}"
        rows.append(f"| {name} | {shown} |")
    return rows


def model_card(config: TrainConfig, summary: dict[str, float], *, is_adapter: bool) -> ModelCard:
    """final/'s README.md: the Hub's metadata (library, tags, base model) and what the run was and measured."""
    base = EMBEDDED_NAME if is_embedded(config.model) else config.model
    variant = f" (loss_type `{', '.join(loss_types(config))}`)" if loss_types(config) else ""
    metadata = ModelCardData(library_name="peft" if is_adapter else "transformers",
                             tags=["smolalign", config.algorithm, "preference-alignment"],
                             base_model=EMBEDDED_HUB_ID if is_embedded(config.model) else hub_id_or_none(config.model))
    lines = [
        f"# {Path(config.output_dir).name}",
        "",
        f"{base} trained by smolalign as {ALGORITHM_TITLES[config.algorithm]}{variant}."
        if config.algorithm == "reward" else f"{base} aligned with {ALGORITHM_TITLES[config.algorithm]}{variant} by smolalign.",
        "",
    ]
    if is_embedded(config.model):
        lines += [WEIGHTS_NOTE, ""]
    lines += [
        "## Training",
        "",
        f"- data: `{config.dataset or 'bundled HH-RLHF harmless sample (Anthropic, MIT)'}`",
        f"- beta: {config.beta}, learning rate: {config.learning_rate} ({config.lr_scheduler_type}), "
        f"batch: {config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation",
        f"- max_length: {config.max_length}, seed: {config.seed}",
        f"- {'LoRA r=' + str(config.lora.r) + (' (merged)' if config.merge_lora else '') if config.lora else 'full fine-tuning'}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *result_rows(summary),
        "",
        "## Use",
        "",
        "```python",
    ]
    if is_adapter:
        auto_class = "AutoPeftModelForSequenceClassification" if config.algorithm == "reward" else "AutoPeftModelForCausalLM"
        lines += [
            f"from peft import {auto_class}",
            "from transformers import AutoTokenizer",
            "",
            f'model = {auto_class}.from_pretrained("path/to/final")  # base model named in adapter_config.json',
        ]
    elif config.algorithm == "reward":
        lines += [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("path/to/final")  # one reward per sequence',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/final")',
        ]
    lines += ['tokenizer = AutoTokenizer.from_pretrained("path/to/final")', "```", ""]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))


def hub_id_or_none(name: str | None) -> str | None:
    """`name` when it is a Hub id (`owner/name`), which the card's base_model can link to; None for a local path."""
    if name is None or looks_like_path(name) or Path(name).exists() or name.count("/") != 1:
        return None
    return name
