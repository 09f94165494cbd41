"""Shared fixtures: tiny Llama-shaped models with the real SmolLM2 tokenizer, and small datasets."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never need the network
if "SMOLALIGN_CACHE" not in os.environ:  # a fresh cache per session: reference log-probs never leak between runs
    os.environ["SMOLALIGN_CACHE"] = tempfile.mkdtemp(prefix="smolalign-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SMOLALIGN_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("SMOLALIGN_CPU_BF16", "0")  # float32 on every CPU, as golden numbers need; bf16 tests set it

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from smolalign.data.sources import bundled_dataset  # noqa: E402
from smolalign.models.embedded import embedded_tokenizer_dir  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir())


def tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    """A 2-layer Llama small enough to train in a second, sized for the SmolLM2 tokenizer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def varied_llama(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny Llama (in eval mode) whose outputs depend on the whole input. With the default initialisation
    (std 0.02) a tied tiny model repeats the prompt's last token whatever came before, which would hide a cache
    or padding mistake; std 0.2 gives a different answer to every prompt, and changing a prompt's first half
    changes it."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, initializer_range=0.2, **overrides)).eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    """`tiny_model(seed)` -> folder of a 2-layer Llama with the SmolLM2 tokenizer, built once per seed."""
    built: dict[int, Path] = {}

    def build(seed: int = 0) -> Path:
        if seed not in built:
            torch.manual_seed(seed)
            config = tiny_llama_config(tokenizer, max_position_embeddings=2048, tie_word_embeddings=True)
            folder = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
            LlamaForCausalLM(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[seed] = folder
        return built[seed]

    return build


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def hh_rows():
    """Bundled HH-RLHF rows, shortest first, so tests stay fast on real text."""
    rows = read_jsonl(Path(bundled_dataset("train")))
    return sorted(rows, key=lambda r: len(r["chosen"]) + len(r["rejected"]))


# --- CUDA: device-agnostic tests take `device` (CPU always, CUDA when present); CUDA-only ones `cuda_device`. ---


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory, hh_rows) -> Path:
    """16 HH-RLHF pairs as a JSONL file (rows 100-115 of the bundled train split)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[100:116])


def tokenize_hh(rows: list[dict], tokenizer):
    """HH-RLHF rows as tokenized pairs (index = position in `rows`), through the chat template."""
    from smolalign.data.columns import map_columns
    from smolalign.data.formats import RowFormat, to_pair
    from smolalign.data.tokenize import tokenize_pairs

    hh_rlhf = RowFormat("hh_rlhf", map_columns(["chosen", "rejected"]))
    return tokenize_pairs([to_pair(row, i, hh_rlhf) for i, row in enumerate(rows)], tokenizer)


@pytest.fixture(scope="session")
def tokenized_pairs(hh_rows, tokenizer):
    """6 HH-RLHF pairs (rows 500-505) tokenized with the real tokenizer's chat template."""
    return tokenize_hh(hh_rows[500:506], tokenizer)


@pytest.fixture(scope="session")
def rows(hh_rows) -> list[dict]:
    """6 HH-RLHF rows (60-65) for evaluation tests."""
    return hh_rows[60:66]


@pytest.fixture
def reference_cache_saves(monkeypatch) -> list[int]:
    """How many new pairs each write to a reference cache added (none when every pair was cached)."""
    from smolalign.core.reference import ReferenceCache

    saves = []
    original = ReferenceCache.save
    monkeypatch.setattr(ReferenceCache, "save", lambda self, values: saves.append(len(values)) or original(self, values))
    return saves


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped where none is present")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Each test taking it runs on the CPU and, where one is present, on the CUDA GPU, in float32 with
    TF32 off so that 1e-4 tolerances mean the same on both."""
    if request.param == "cuda":
        _full_float32_matmuls(request)
    return torch.device(request.param)


@pytest.fixture
def cuda_device(request) -> torch.device:
    """The CUDA GPU (the test is skipped without one), with TF32 off: float32 means float32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    _full_float32_matmuls(request)
    return torch.device("cuda")


def _full_float32_matmuls(request) -> None:
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    request.addfinalizer(lambda: _restore_tf32(previous))


def _restore_tf32(previous: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    """`native_bf16_cpu(True)`: this CPU counts as one with native bf16 (as SMOLALIGN_CPU_BF16=1 says); False:
    without."""
    from smolalign.models import precision

    def set_native(value: bool) -> None:
        monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "1" if value else "0")
        precision.cpu_native_bf16.cache_clear()

    yield set_native
    precision.cpu_native_bf16.cache_clear()
