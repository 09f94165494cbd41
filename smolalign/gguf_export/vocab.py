"""The tokenizer as llama.cpp runs it (`tokenizer.ggml.*`, `tokenizer.chat_template`): byte-level BPE
vocabulary, token types, merges, special tokens, and the name of the rule that splits text before BPE."""

from __future__ import annotations

import json
import re

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from smolalign.errors import UserError

# Llama 3's split of text before BPE (its tokenizer.json); llama.cpp knows it as "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def add_tokenizer_metadata(
    writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, *, vocab_size: int
) -> None:
    """Vocabulary, merges, special tokens and chat template; `vocab_size` is the model's embedding rows."""
    spec = tokenizer_spec(tokenizer)
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_type(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = added_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def tokenizer_spec(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The tokenizer's tokenizer.json, checked to be a byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = spec.get("model", {}).get("type")
    if kind != "BPE":
        raise UserError(f"the model's tokenizer ({kind or type(tokenizer).__name__}) cannot be exported to "
                        "GGUF: only byte-level BPE tokenizers (SmolLM2, Llama 3) are supported.")
    return spec


def pre_tokenizer_type(spec: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (`tokenizer.ggml.pre`).

    llama.cpp does not run a tokenizer.json's pre-tokenizer: it knows splitting rules by name. SmolLM2 splits
    digits one by one, then as GPT-2 does ("smollm"); a tokenizer that splits as GPT-2 does over a
    vocabulary without multi-digit tokens (SmolLM2's read back from a GGUF file) tokenizes the same under
    that name. Llama 3 has its own expression ("llama-bpe").
    """
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and _gpt2_split(steps[1]):
        return "smollm"
    if kinds == ["ByteLevel"] and _gpt2_split(steps[0]):
        return "gpt-2" if _joins_digits(spec) else "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise UserError(f"the model's tokenizer splits text in a way llama.cpp does not know "
                    f"({' + '.join(map(str, kinds))}), so it cannot be exported to GGUF; SmolLM2 and Llama 3 "
                    "tokenizers are supported.")


def _gpt2_split(step: dict) -> bool:
    return step.get("use_regex", True) and not step.get("add_prefix_space", False)


def _joins_digits(spec: dict) -> bool:
    """Whether a token holds a digit beside another character (its vocabulary was learned without splitting
    digits one by one)."""
    return any(len(token) > 1 and re.search("[0-9]", token) for token in spec["model"]["vocab"])


def token_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token and type per row of the embedding: added special tokens are CONTROL, other added tokens
    USER_DEFINED (matched whole in text), rows no token uses `[PADn]` UNUSED, as llama.cpp's converter."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has {max(by_id) + 1} tokens but the model only {vocab_size} "
                        "embeddings; resize the model's embeddings to the tokenizer before exporting it.")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            if index not in added:
                types.append(TokenType.NORMAL)
            else:
                types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    return tokens, types


def added_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding text adds BOS in front and EOS at the end, seen on a probe (the flags are spread over
    tokenizer_config.json and the post-processor)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos
