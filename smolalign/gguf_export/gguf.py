"""`export_gguf`: a model as one GGUF file that llama.cpp, Ollama and LM Studio run.

The model is loaded in float32 (a LoRA adapter is merged into its base first) and must be a Llama
(SmolLM2, Llama 3.2). The file is written tensor by tensor to a temporary name beside the target and
renamed when complete, so a failed or interrupted export never leaves a partial file.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import gguf
import numpy as np
import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from smolalign.config.choices import QUANTIZATIONS
from smolalign.errors import RunError, UserError, first_line
from smolalign.gguf_export.metadata import add_model_metadata, rope_factors
from smolalign.gguf_export.tensors import GGUFTensor, plan_tensors
from smolalign.gguf_export.vocab import add_tokenizer_metadata
from smolalign.hub import hub_failure_reason
from smolalign.models.embedded import EMBEDDED_NAME, is_embedded
from smolalign.models.loading import model_source
from smolalign.run_folder import RunFolder

log = logging.getLogger("smolalign")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_gguf(model: str | Path | None, output: str | Path, *, quantization: str = "q8_0") -> Path:
    """Write `model` as a GGUF file at `output`; returns the path written.

    Args:
        model: a run folder (its final/ model), a Hugging Face model or LoRA adapter folder, a Hub id, or
            None / "embedded" for the embedded SmolLM2-135M-Instruct.
        output: the .gguf file; an existing one is replaced only once the new one is complete.
        quantization: f32, f16, bf16, q8_0, q4_0 or q4_1. 1-D tensors stay float32, matrices whose rows are
            not whole blocks of the type are stored in f16, and a 4-bit file keeps the output head in q8_0.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown GGUF quantization '{quantization}'; choose one of "
                        f"{', '.join(QUANTIZATIONS)}.")
    target = output_path(output)
    model = None if model is None else str(model)
    label = model or "embedded"
    source = model_folder(model)
    language_model, tokenizer = load_for_export(source, label=label)
    writer = gguf.GGUFWriter(None, "llama")
    name = display_name(model, source)
    add_model_metadata(writer, language_model.config, name=name, quantization=quantization)
    add_tokenizer_metadata(writer, tokenizer, vocab_size=language_model.get_input_embeddings().num_embeddings)
    tensors = plan_tensors(language_model, quantization, rope_factors=rope_factors(language_model))
    write_file(writer, tensors, target, description=f"GGUF {quantization}")
    log.info("wrote %s (%s, %.1f MB) from %s", target, quantization, target.stat().st_size / 1e6, label)
    return target


def output_path(output: str | Path) -> Path:
    """The .gguf file to write, in a folder that exists (created) and can be written."""
    target = Path(output).expanduser()
    if target.suffix.lower() != ".gguf":
        raise UserError(f"the GGUF output must be a file name ending in .gguf, not '{output}'.")
    if target.is_dir():
        raise UserError(f"the GGUF output '{output}' is a folder; name the .gguf file to write in it.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise UserError(f"cannot create the folder of '{output}': {reason}.") from None
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"cannot write '{output}': its folder '{target.parent}' is not writable.")
    return target


def model_folder(model: str | None) -> str:
    """The folder or Hub id to export; a run folder stands for its final/ model."""
    if model is not None and not is_embedded(model):
        run = RunFolder(Path(model).expanduser())
        is_model = any((run.path / name).is_file() for name in ("config.json", "adapter_config.json"))
        if run.config_file.is_file() and not is_model:
            if not run.final.is_dir():
                raise UserError(f"the run in '{model}' has no final model yet; export it once it has "
                                "finished (resume it with --resume_from_checkpoint latest).")
            model = str(run.final)
    return model_source(model)


def display_name(model: str | None, source: str) -> str:
    """`general.name`: what the model is called (the run's name for a run's final/)."""
    if is_embedded(model):
        return EMBEDDED_NAME
    path = Path(source)
    return path.parent.name if RunFolder.of_final(path) else path.name


def load_for_export(source: str, *, label: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The float32 Llama (a LoRA adapter merged into its base, as peft's merge_and_unload), and its
    tokenizer (the base model's when the adapter folder has none)."""
    adapter_config = Path(source) / "adapter_config.json"
    tokenizer_source = source
    if adapter_config.is_file():
        base = adapter_base(adapter_config, label=label)
        model = merge_adapter(load_llama(base, label=label), source, label=label)
        if not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
            tokenizer_source = base
    else:
        model = load_llama(source, label=label)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:  # missing or corrupt tokenizer files, no network
        raise load_failure(label, tokenizer_source, error) from None
    return model, tokenizer


def adapter_base(adapter_config: Path, *, label: str) -> str:
    """The folder or Hub id of a LoRA adapter's base model."""
    settings = json.loads(adapter_config.read_text())
    if settings.get("task_type") == "SEQ_CLS":
        raise UserError(f"'{label}' is a LoRA adapter of a reward model, not of a language model; GGUF "
                        "export needs a causal language model.")
    if not settings.get("base_model_name_or_path"):
        raise UserError(f"the LoRA adapter in '{label}' does not name its base model "
                        "(base_model_name_or_path in adapter_config.json).")
    return model_source(settings["base_model_name_or_path"])


def load_llama(source: str, *, label: str) -> PreTrainedModel:
    """A Llama-family causal LM in float32; any other architecture is refused before its weights load."""
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        raise load_failure(label, source, error) from None
    if config.model_type != "llama":
        raise UserError(f"'{label}' is a {config.model_type} model; GGUF export supports the Llama family "
                        "only (SmolLM2, Llama 3.2).")
    other_heads = [name for name in config.architectures or [] if not name.endswith("ForCausalLM")]
    if other_heads:
        raise UserError(f"'{label}' is a {other_heads[0]}, not a language model; GGUF export needs a causal "
                        "language model.")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except Exception as error:
        raise load_failure(label, source, error) from None
    return model.eval()


def merge_adapter(base: PreTrainedModel, adapter: str, *, label: str) -> PreTrainedModel:
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except Exception as error:
        raise UserError(f"cannot load the LoRA adapter in '{label}' on its base model "
                        f"({first_line(error)}).") from None
    return model.merge_and_unload().eval()


def load_failure(label: str, source: str, error: Exception) -> UserError:
    if Path(source).is_dir():
        return UserError(f"cannot load '{label}' for GGUF export: {first_line(error)}")
    return UserError(f"cannot load '{source}': it is not a local folder and {hub_failure_reason(error)}.")


def write_file(writer: gguf.GGUFWriter, tensors: list[GGUFTensor], target: Path, *, description: str) -> None:
    """Header, metadata and tensors into a temporary file beside `target`, renamed to it once complete; the
    temporary file is removed whatever stops the writing."""
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.qtype)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tqdm(tensors, desc=description, unit="tensor"):
            writer.write_tensor_data(tensor.encode())
        writer.close()
        partial.replace(target)
    except OSError as error:
        raise RunError(f"could not write '{target}': {error.strerror or first_line(error)}; no partial file "
                       "was left.") from None
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
