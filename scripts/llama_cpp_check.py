"""Run exported GGUF files in llama.cpp itself and compare with transformers on the source model.

    python scripts/llama_cpp_check.py FILE.gguf [FILE.gguf ...] [--model SOURCE] [--prompts 16] [--new_tokens 24]

llama.cpp comes from node-llama-cpp's prebuilt binaries (npm; installed into scripts/llama_cpp/node_modules on
first use). For held-out HH-RLHF prompts in the model's chat template, it reports how many prompts llama.cpp
tokenizes to the same ids as the Hugging Face tokenizer, and how many greedy answers it gives equal to
transformers' greedy answers on the float32 source model (SOURCE: a folder, Hub id, or the embedded default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolalign.data.messages import parse_hh_transcript
from smolalign.data.sources import bundled_dataset
from smolalign.models.loading import model_source

HERE = Path(__file__).resolve().parent / "llama_cpp"


def chat_prompts(tokenizer, count: int) -> list[str]:
    """The first user turn of the first `count` bundled HH-RLHF test conversations, in the chat template."""
    rows = [json.loads(line) for line in Path(bundled_dataset("test")).read_text().splitlines()[:count]]
    turns = [parse_hh_transcript(row["chosen"])[0]["content"] for row in rows]
    return [tokenizer.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                          add_generation_prompt=True) for turn in turns]


def llama_cpp_answers(gguf: Path, prompts: list[str], new_tokens: int) -> list[dict]:
    if not (HERE / "node_modules" / "node-llama-cpp").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=HERE, check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(prompts, file)
        file.flush()
        result = subprocess.run(["node", "complete.mjs", str(gguf.resolve()), file.name, str(new_tokens)], cwd=HERE,
                                capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="+", type=Path)
    parser.add_argument("--model", default=None, help="the source model; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=24)
    args = parser.parse_args()
    folder = model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, args.prompts)
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            output = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False)
        answer = tokenizer.decode(output[0, len(ids):]).split(tokenizer.eos_token)[0]  # llama.cpp stops before EOS
        expected.append((ids, answer))
    print("| file | same token ids | same greedy answer |\n|---|---|---|")
    for gguf in args.gguf:
        got = llama_cpp_answers(gguf, prompts, args.new_tokens)
        ids = sum(g["tokens"] == e[0] for g, e in zip(got, expected, strict=True))
        answers = sum(g["answer"] == e[1] for g, e in zip(got, expected, strict=True))
        print(f"| {gguf.name} | {ids}/{len(prompts)} | {answers}/{len(prompts)} |")


if __name__ == "__main__":
    main()
