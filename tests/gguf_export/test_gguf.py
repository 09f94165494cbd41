"""GGUF export, checked by readers that share no code with the writer: transformers' GGUF loader (config,
tokenizer, de-quantized weights) and gguf.GGUFReader (metadata, tensor names, types and bytes), against the
source model's own config, tokenizer and logits on real HH-RLHF text. Reading a file back takes seconds (its
vocabulary), so the tests that read many files are marked slow."""

from __future__ import annotations

import errno
import functools
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from smolalign.config.choices import QUANTIZATIONS
from smolalign.data.sources import bundled_dataset
from smolalign.errors import RunError, UserError
from smolalign.gguf_export.gguf import export_gguf
from smolalign.gguf_export.tensors import STORAGE
from smolalign.models import embedded
from smolalign.models.loading import load_model, load_tokenizer, model_source

BUNDLED_TEST = Path(bundled_dataset("test"))
# Every variant has GQA (4 query heads over 2 key/value heads). `untied` keeps the default initialisation (std
# 0.02), under which the next token depends on the text; `tied` has std 0.2, so large logits; `uneven` has
# feed-forward rows of 80 values, not whole 32-value blocks.
VARIANTS = {
    "untied": {"tie_word_embeddings": False},
    "tied": {"tie_word_embeddings": True, "initializer_range": 0.2},
    "uneven": {"tie_word_embeddings": False, "intermediate_size": 80},
}
CONTROL, NORMAL = 3, 1  # llama.cpp's token types


# --- fixtures and readers ---


@pytest.fixture(scope="module")
def hh_texts() -> list[str]:
    """The first 16 conversations of the bundled HH-RLHF test split, chosen then rejected."""
    rows = [json.loads(line) for line in BUNDLED_TEST.read_text().splitlines()[:16]]
    return [row[side] for row in rows for side in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> torch.Tensor:
    """The first 64 tokens of the first 16 conversations of the bundled HH-RLHF test split that have as many:
    one batch, 1,024 positions."""
    rows = [json.loads(line) for line in BUNDLED_TEST.read_text().splitlines()]
    ids = [tokenizer(row["chosen"]).input_ids for row in rows]
    return torch.tensor([row[:64] for row in ids if len(row) >= 64][:16])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    """`model_folder(variant)` -> a saved tiny Llama (weights, config, tokenizer), built once per variant."""
    built: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in built:
            config = tiny_llama_config(tokenizer)
            config.update(VARIANTS[variant])
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(variant)
            LlamaForCausalLM(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[variant] = folder
        return built[variant]

    return build


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_folder):
    """`exported(variant, quantization)` -> that model's GGUF file, written once."""
    files: dict[tuple[str, str], Path] = {}

    def export(variant: str, quantization: str) -> Path:
        if (variant, quantization) not in files:
            output = tmp_path_factory.mktemp("gguf") / f"{variant}-{quantization}.gguf"
            export_gguf(str(model_folder(variant)), output, quantization=quantization)
            files[variant, quantization] = output
        return files[variant, quantization]

    return export


@functools.cache
def read_model(path: Path) -> LlamaForCausalLM:
    """The file as transformers reads it: de-quantized to float32, rotary rows put back in its layout (read
    once: parsing the vocabulary takes seconds)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def read_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def reader(path: Path) -> gguf.GGUFReader:
    """The file parsed once (its vocabulary makes that take seconds); every file here is written once."""
    return gguf.GGUFReader(path)


def fields(path: Path) -> dict:
    """Every metadata value of the file, as gguf.GGUFReader decodes it."""
    return {name: field.contents() for name, field in reader(path).fields.items()}


def tensors(path: Path) -> dict:
    return {tensor.name: tensor for tensor in reader(path).tensors}


def float_values(tensor) -> np.ndarray:
    """A tensor read by GGUFReader, de-quantized, in torch's (rows, columns) order."""
    values = gguf.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- what llama.cpp reads ---


def test_metadata_says_what_the_model_and_tokenizer_are(exported, model_folder, tokenizer):
    config = AutoConfig.from_pretrained(model_folder("untied"))
    values = fields(exported("untied", "q8_0"))
    assert values["general.architecture"] == "llama"
    assert values["general.name"] == model_folder("untied").name
    expected = {"llama.context_length": config.max_position_embeddings, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.vocab_size": 49152, "general.file_type": 7}  # llama.cpp's MOSTLY_Q8_0
    assert {key: values[key] for key in expected} == expected
    assert values["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
    vocab = tokenizer.get_vocab()
    assert (values["tokenizer.ggml.model"], values["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert values["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    types = values["tokenizer.ggml.token_type"]
    assert {i for i, kind in enumerate(types) if kind == CONTROL} == special and len(special) == 17
    assert {kind for i, kind in enumerate(types) if i not in special} == {NORMAL}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert values["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    ids = [values[f"tokenizer.ggml.{name}_token_id"] for name in ("bos", "eos", "unknown", "padding")]
    assert ids == [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
                   tokenizer.pad_token_id]
    assert (values["tokenizer.ggml.add_bos_token"], values["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert values["tokenizer.chat_template"] == tokenizer.chat_template


PER_LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
             "ffn_down")


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "quantization", "token_embd", "output", "attn_q", "ffn_down"), [
    ("untied", "q4_1", "Q4_1", "Q8_0", "Q4_1", "Q4_1"),
    ("tied", "q4_1", "Q8_0", None, "Q4_1", "Q4_1"),
    ("uneven", "q8_0", "Q8_0", "Q8_0", "Q8_0", "F16"),
    ("uneven", "q4_0", "Q4_0", "Q8_0", "Q4_0", "F16"),
    ("untied", "bf16", "BF16", "BF16", "BF16", "BF16"),
])
def test_tensors_have_llama_cpp_names_and_storage_types(exported, variant, quantization, token_embd, output,
                                                        attn_q, ffn_down):
    """A tied head is read from token_embd (so it takes the head's 8 bits in a 4-bit file); rows of 80 values
    are not whole 32-value blocks and stay f16; norms stay float32."""
    stored = tensors(exported(variant, quantization))
    names = {f"blk.{i}.{name}.weight" for i in range(2) for name in PER_LAYER}
    names |= {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if output else set())
    assert set(stored) == names
    kind = {name: tensor.tensor_type.name for name, tensor in stored.items()}
    assert (kind["token_embd.weight"], kind.get("output.weight")) == (token_embd, output)
    assert {kind[f"blk.{i}.attn_q.weight"] for i in range(2)} == {attn_q}
    assert {kind[f"blk.{i}.ffn_down.weight"] for i in range(2)} == {ffn_down}
    assert {kind[name] for name in kind if name.endswith("norm.weight")} == {"F32"}


@pytest.mark.slow
def test_query_and_key_rows_are_interleaved_per_head(exported, model_folder):
    """llama.cpp rotates dimensions (2i, 2i+1) of a head where transformers rotates (i, i + head_dim/2)."""
    model = LlamaForCausalLM.from_pretrained(model_folder("untied"))
    stored = tensors(exported("untied", "f32"))
    for layer in range(2):
        attention = model.model.layers[layer].self_attn
        for name, weight, heads in (("attn_q", attention.q_proj.weight, 4),
                                    ("attn_k", attention.k_proj.weight, 2)):
            size = weight.shape[0] // heads
            rows = [head * size + i // 2 + (i % 2) * size // 2 for head in range(heads) for i in range(size)]
            stored_rows = float_values(stored[f"blk.{layer}.{name}.weight"])
            np.testing.assert_array_equal(stored_rows, weight.detach()[rows])


# --- read back by transformers ---


@pytest.mark.slow
def test_transformers_reads_back_the_same_config(exported, model_folder):
    source = AutoConfig.from_pretrained(model_folder("untied"))
    read = read_model(exported("untied", "q8_0")).config
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
             "tie_word_embeddings", "bos_token_id", "eos_token_id")
    assert {name: getattr(read, name) for name in names} == {name: getattr(source, name) for name in names}
    assert read.rms_norm_eps == pytest.approx(source.rms_norm_eps, rel=1e-6)
    assert read.rope_parameters["rope_theta"] == pytest.approx(source.rope_parameters["rope_theta"])


@pytest.mark.slow
def test_tokenizer_read_back_encodes_real_text_token_for_token(exported, tokenizer, hh_texts):
    read = read_tokenizer(exported("untied", "q8_0"))
    for text in [*hh_texts, "Call 911, or dial 0800 123 4567 <|im_end|> before 2024!"]:
        assert read(text).input_ids == tokenizer(text).input_ids
    conversation = [{"role": "user", "content": hh_texts[0]},
                    {"role": "assistant", "content": "I can't help with that."}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert read.apply_chat_template(conversation, tokenize=False) == rendered
    assert read(rendered).input_ids == tokenizer(rendered).input_ids
    specials = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
    assert [getattr(read, name) for name in specials] == [getattr(tokenizer, name) for name in specials]


# Largest logit difference over the largest logit; measured: f32 0 (both), f16 0.04% (untied), bf16 2.3%
# (tied, whose std-0.2 weights amplify rounding).
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "quantization", "tolerance"), [
    ("untied", "f32", 1e-6), ("tied", "f32", 1e-6), ("untied", "f16", 1e-3), ("tied", "bf16", 5e-2),
])
def test_float_exports_give_the_source_models_logits(exported, model_folder, text_ids, variant, quantization,
                                                     tolerance):
    """f32 is exact up to float error; f16 and bf16 round every weight (11 and 8 significant bits), so the
    logits move by a fraction of their largest magnitude."""
    expected = logits(LlamaForCausalLM.from_pretrained(model_folder(variant)), text_ids)
    got = logits(read_model(exported(variant, quantization)), text_ids)
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


# Measured: q8_0 0.989, q4_1 0.779, q4_0 0.695.
@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "at_least"), [("q8_0", 0.97), ("q4_1", 0.75), ("q4_0", 0.65)])
def test_quantized_exports_mostly_pick_the_source_models_next_token(exported, model_folder, text_ids,
                                                                   quantization, at_least):
    """Top-1 agreement over 1,024 positions of real text. A random tiny model has small margins between its
    top tokens, so 4 bits flip more of them than in a trained model (see the embedded model's numbers)."""
    expected = logits(LlamaForCausalLM.from_pretrained(model_folder("untied")), text_ids).argmax(-1)
    got = logits(read_model(exported("untied", quantization)), text_ids).argmax(-1)
    assert (got == expected).float().mean().item() >= at_least


@pytest.mark.slow
def test_a_lora_adapter_is_merged_as_peft_merges_it(model_folder, tmp_path, text_ids):
    """The adapter folder has no tokenizer: the base model's is used."""
    base = model_folder("untied")
    torch.manual_seed(1)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                             LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "run" / "final")
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "run" / "final")
    merged = merged.merge_and_unload().eval()
    path = export_gguf(str(tmp_path / "run" / "final"), tmp_path / "lora.gguf", quantization="f32")
    expected, got = logits(merged, text_ids), logits(read_model(path), text_ids)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    before = logits(LlamaForCausalLM.from_pretrained(base), text_ids)
    assert (before - expected).abs().max() > 1e-2 * expected.abs().max()  # the adapter changed the model
    assert read_tokenizer(path)("a test").input_ids == AutoTokenizer.from_pretrained(base)("a test").input_ids


# --- rope scaling and other tokenizers ---


def save_variant(folder: Path, tokenizer, **overrides) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_llama3_rope_scaling_is_written_as_frequency_factors(tokenizer, tmp_path):
    """Llama 3's scaling as its reference code states it: wavelengths under original/high_freq_factor keep
    their frequency, those over original/low_freq_factor are divided by `factor`, those between blend."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = save_variant(tmp_path / "llama3", tokenizer, rope_parameters=rope)
    path = export_gguf(str(folder), tmp_path / "llama3.gguf", quantization="f32")
    expected = []
    for pair in range(8):  # head_dim 16
        wavelength = 2 * math.pi * rope["rope_theta"] ** (2 * pair / 16)
        smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
        expected.append(1.0 if wavelength < 64 / 4.0 else 32.0 if wavelength > 64 / 1.0
                        else 1 / ((1 - smooth) / 32.0 + smooth))
    factors = tensors(path)["rope_freqs.weight"]
    assert factors.tensor_type.name == "F32"
    np.testing.assert_allclose(factors.data, expected, rtol=1e-5)
    assert set(expected) - {1.0, 32.0} and {1.0, 32.0} <= set(expected)  # the three regimes are all there
    assert fields(path)["llama.rope.freq_base"] == 500000.0


@pytest.mark.slow
def test_linear_rope_scaling_is_metadata_and_other_scalings_are_refused(tokenizer, tmp_path):
    linear = {"rope_type": "linear", "factor": 4.0}
    folder = save_variant(tmp_path / "linear", tokenizer, rope_parameters=linear)
    values = fields(export_gguf(str(folder), tmp_path / "linear.gguf", quantization="f32"))
    assert (values["llama.rope.scaling.type"], values["llama.rope.scaling.factor"]) == ("linear", 4.0)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    folder = save_variant(tmp_path / "yarn", tokenizer, rope_parameters=yarn)
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        export_gguf(str(folder), tmp_path / "out" / "yarn.gguf")
    assert files_in(tmp_path / "out") == []


@pytest.mark.slow
def test_a_llama3_tokenizer_is_llama_bpe_and_adds_bos(model_folder, tmp_path, hh_texts):
    """Llama 3 splits text with its own expression and starts every text with BOS; the split is the one
    transformers' GGUF reader applies for "llama-bpe"."""
    llama3 = AutoTokenizer.from_pretrained(model_folder("untied"))
    llama3.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{llama3.bos_token} $A", special_tokens=[(llama3.bos_token, llama3.bos_token_id)])
    folder = save_variant(tmp_path / "llama3-tokenizer", llama3)
    llama3 = AutoTokenizer.from_pretrained(folder)
    path = export_gguf(str(folder), tmp_path / "llama3-tokenizer.gguf", quantization="q8_0")
    values = fields(path)
    assert (values["tokenizer.ggml.pre"], values["tokenizer.ggml.add_bos_token"]) == ("llama-bpe", True)
    read = read_tokenizer(path)
    for text in [*hh_texts[:8], "Call 911, or dial 0800 123 4567 before 2024!"]:
        assert read(text).input_ids == llama3(text).input_ids
        assert llama3(text).input_ids[0] == llama3.bos_token_id


# --- where the model comes from ---


@pytest.mark.slow
def test_a_run_folder_exports_its_final_model(model_folder, tmp_path):
    run = tmp_path / "my-run"
    shutil.copytree(model_folder("untied"), run / "final")
    (run / "config.yaml").write_text("algorithm: dpo\n")
    path = export_gguf(str(run), tmp_path / "run.gguf", quantization="f32")
    assert fields(path)["general.name"] == "my-run"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("algorithm: dpo\n")
    with pytest.raises(UserError, match="has no final model yet"):
        export_gguf(str(unfinished), tmp_path / "unfinished.gguf")


@pytest.mark.slow
def test_a_gguf_file_loads_as_a_model_through_one_cached_conversion(exported, tokenizer, text_ids, hh_texts,
                                                                    monkeypatch):
    """`chat FILE.gguf` and `eval --model FILE.gguf` load through model_source, converted once."""
    path = exported("untied", "q8_0")
    model = load_model(str(path), dtype=torch.float32, device=torch.device("cpu")).eval()
    torch.testing.assert_close(logits(model, text_ids), logits(read_model(path), text_ids), rtol=0, atol=1e-6)
    assert load_tokenizer(str(path))(hh_texts[0]).input_ids == tokenizer(hh_texts[0]).input_ids
    folder = model_source(str(path))
    monkeypatch.setattr(embedded, "_convert_gguf", lambda *args: pytest.fail("converted a second time"))
    assert model_source(str(path)) == folder
    with pytest.raises(UserError, match="does not exist"):
        model_source(str(path.with_name("missing.gguf")))


# --- mistakes and failures leave no file ---


def test_models_other_than_llama_are_refused_by_name(tmp_path, tokenizer):
    qwen = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(qwen).save_pretrained(tmp_path / "qwen")
    reward = tiny_llama_config(tokenizer, num_labels=1)
    LlamaForSequenceClassification(reward).save_pretrained(tmp_path / "reward")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a model")
    output = tmp_path / "out" / "model.gguf"
    with pytest.raises(UserError, match="'.*qwen' is a qwen2 model; GGUF export supports the Llama family"):
        export_gguf(str(tmp_path / "qwen"), output)
    with pytest.raises(UserError, match="is a LlamaForSequenceClassification, not a language model"):
        export_gguf(str(tmp_path / "reward"), output)
    with pytest.raises(UserError, match="not a model folder"):
        export_gguf(str(tmp_path / "notes"), output)
    assert files_in(tmp_path / "out") == []


def test_every_quantization_the_config_offers_has_a_storage_type():
    assert tuple(STORAGE) == QUANTIZATIONS


def test_bad_outputs_and_quantizations_are_one_sentence(model_folder, tmp_path):
    model = str(model_folder("untied"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(UserError, match="cannot create the folder of"):
        export_gguf(model, tmp_path / "a-file" / "model.gguf")
    with pytest.raises(UserError, match="must be a file name ending in .gguf"):
        export_gguf(model, tmp_path / "model.bin")
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(model, tmp_path / "folder.gguf")
    with pytest.raises(UserError, match="unknown GGUF quantization 'q5_k'; choose one of f32, f16, bf16"):
        export_gguf(model, tmp_path / "model.gguf", quantization="q5_k")
    assert files_in(tmp_path) == ["a-file", "folder.gguf"]


@pytest.mark.parametrize(("failure", "raised", "message"), [
    (OSError(errno.ENOSPC, "No space left on device"), RunError,
     "could not write .*model.gguf': No space left on device; no partial file was left."),
    (KeyboardInterrupt(), KeyboardInterrupt, None),
])
def test_a_failed_write_leaves_no_partial_file_and_the_old_file_intact(model_folder, tmp_path, monkeypatch,
                                                                      failure, raised, message):
    """The disk fills up (or the user presses Ctrl-C) after the first tensor."""
    target = tmp_path / "model.gguf"
    target.write_bytes(b"the previous export")
    write = gguf.GGUFWriter.write_tensor_data
    written = []

    def fail_after_one(self, tensor, *args, **kwargs):
        if written:
            raise failure
        written.append(tensor.nbytes)
        write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_after_one)
    with pytest.raises(raised, match=message):
        export_gguf(str(model_folder("untied")), target)
    assert written and files_in(tmp_path) == ["model.gguf"]
    assert target.read_bytes() == b"the previous export"


# --- the embedded model against the file it came from ---


@pytest.mark.slow
def test_the_embedded_model_exported_at_q4_1_reproduces_its_source_file(tmp_path, capsys):
    """The embedded weights are the de-quantized Q4_1 file (its head in Q8_0). Every block of that file spans
    its whole range (its smallest value is level 0 and its largest level 15; -127 or 127 in Q8_0), so
    quantizing the de-quantized values again gives the same bytes. The metadata is what llama.cpp's own
    converter wrote."""
    source = embedded.gguf_path()
    path = export_gguf(None, tmp_path / "smollm2.gguf", quantization="q4_1")
    original, mine = fields(source), fields(path)
    shared = [key for key in original
              if key.startswith(("llama.", "tokenizer.")) or key == "general.file_type"]
    shared.remove("tokenizer.ggml.add_space_prefix")  # a sentencepiece setting, unused by byte-level BPE
    assert {key: mine[key] for key in shared} == {key: original[key] for key in shared}
    counts, largest = compare_blocks(tensors(source), tensors(path))
    with capsys.disabled():
        print(f"\nembedded q4_1 round trip: [identical, all] blocks per type {counts}, largest difference of "
              f"de-quantized values {largest:.3g}")
    # Measured: all identical (3,317,760 Q4_1 and 884,736 Q8_0 blocks, 35,136 float32 values), difference 0.
    assert all(identical >= 0.999 * total for identical, total in counts.values())
    assert counts["F32"][0] == counts["F32"][1] and largest < 1e-2


def compare_blocks(original: dict, mine: dict) -> tuple[dict[str, list[int]], float]:
    """Per storage type, [identical blocks, blocks]; and the largest difference of de-quantized values."""
    assert set(mine) == set(original)
    counts: dict[str, list[int]] = {}
    largest = 0.0
    for name, tensor in original.items():
        assert mine[name].tensor_type == tensor.tensor_type, name
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        theirs, ours = (np.asarray(item.data).view(np.uint8).reshape(-1, block_bytes)
                        for item in (tensor, mine[name]))
        count = counts.setdefault(tensor.tensor_type.name, [0, 0])
        count[0] += int((theirs == ours).all(axis=1).sum())
        count[1] += len(theirs)
        largest = max(largest, float(np.abs(float_values(tensor) - float_values(mine[name])).max()))
    return counts, largest
