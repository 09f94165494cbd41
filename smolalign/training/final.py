"""The run's deliverable: `final/`, loadable by plain transformers (or PEFT), with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from smolalign.config.choices import ALGORITHM_TITLES
from smolalign.config.train import TrainConfig
from smolalign.models.embedded import EMBEDDED_NAME, WEIGHTS_NOTE, is_embedded
from smolalign.stats import ACCURACY_METRICS, Proportion


def save_final_model(
    model, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, output_dir: Path, summary: dict[str, float]
) -> Path:
    """Write final/ atomically: a full model, a PEFT adapter, or (merge_lora) the merged full model."""
    final = output_dir / "final"
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter and config.merge_lora:
        model, is_adapter = model.merge_and_unload(), False
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(model_card(config, summary, is_adapter=is_adapter))
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


def model_card(config: TrainConfig, summary: dict[str, float], *, is_adapter: bool) -> str:
    base = EMBEDDED_NAME if is_embedded(config.model) else config.model
    variant = f" (loss_type `{config.loss_type}`)" if config.algorithm == "dpo" else ""
    lines = [
        "---",
        "library_name: " + ("peft" if is_adapter else "transformers"),
        "tags: [smolalign, " + config.algorithm + ", preference-alignment]",
        "---",
        "",
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
    return "\n".join(lines)
