"""`smolalign` command line: train, eval, compare, sweep, bench, chat, data inspect.

User mistakes end with one sentence on stderr and exit status 2, a run that had to stop (non-finite
losses, a failed save) with one sentence and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from smolalign.errors import RunError, UserError

log = logging.getLogger("smolalign")

TRAIN_USAGE = """smolalign train [--config FILE.yaml] [--KEY VALUE ...]

Defaults come from the dataclass, then the YAML file, then --KEY VALUE flags (nested keys as
--lora.r 8). Keys:
"""


def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value

    parse.__name__ = "non-negative int" if minimum == 0 else "positive int"
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        if args.command not in ("train", "sweep") and rest:
            raise UserError(f"unrecognised arguments: {' '.join(rest)}")
        args.run(args, rest)
    except UserError as error:
        print(f"smolalign: error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunError as error:
        print(f"smolalign: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("smolalign: interrupted", file=sys.stderr)
        sys.exit(130)


def _configure_logging() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not the user's concern
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("smolalign: %(message)s"))
    log.handlers = [handler]  # main() may run more than once in a process (tests): one handler, current stderr
    log.setLevel(logging.INFO)
    log.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight loading takes a second; our own bars show long work


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolalign", description="Align small language models with preferences.")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser(
        "train", help="train a model: DPO and variants, ORPO, SimPO, SFT, or a reward model", add_help=False
    )
    train.add_argument("--config", help="YAML file with the run's settings")
    train.add_argument("-h", "--help", action="store_true")
    train.set_defaults(run=_run_train)

    evaluate = commands.add_parser("eval", help="held-out preference accuracy, drift, generations and a judge's win rate")
    evaluate.add_argument("--model", required=True, help="model folder (a final/ folder, full or LoRA) or Hub id")
    evaluate.add_argument("--dataset", required=True, help="preference pairs (file or Hub id)")
    evaluate.add_argument("--ref_model", help="reference model; default: the base model of a LoRA adapter, else none")
    evaluate.add_argument("--output_dir", help="where eval.json and the rest go; default RUN/eval for RUN/final, else ./eval")
    evaluate.add_argument("--split", default="test", help="split of a Hub dataset")
    # Unset, the next options take the values of the run whose final/ is evaluated (else training's defaults).
    evaluate.add_argument("--beta", type=float, help="reward scale (DPO beta); default: the run's, else 0.1")
    evaluate.add_argument("--max_length", type=positive_int, help="default: the run's, else 1024")
    evaluate.add_argument("--max_prompt_length", type=positive_int, help="default: the run's")
    evaluate.add_argument("--logprob_chunk_size", type=positive_int, help="output-head chunk; default: the run's, else 256")
    evaluate.add_argument("--max_pairs", type=positive_int, help="use only the first N pairs")
    evaluate.add_argument("--batch_size", type=positive_int, default=8)
    evaluate.add_argument("--batch_layout", default="auto", choices=["auto", "padded", "packed", "prefix_shared"])
    evaluate.add_argument("--chat_template", help="'chatml' for a base model without a chat template")
    evaluate.add_argument("--system_prompt")
    evaluate.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                          help="answer the first N prompts with the policy and the reference, side by side")
    evaluate.add_argument("--max_new_tokens", type=positive_int, default=128)
    evaluate.add_argument("--generation_batch_size", type=positive_int, default=16,
                          help="prompts answered together (greedy answers are the same for any size)")
    evaluate.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--top_p", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--judge", help="reward model (sequence classification; folder or Hub id) that judges answers")
    evaluate.add_argument("--judge_url", help="OpenAI-compatible chat endpoint that judges answers (…/v1)")
    evaluate.add_argument("--judge_model", help="model name to ask at --judge_url")
    evaluate.add_argument("--judge_api_key_env", default="SMOLALIGN_JUDGE_API_KEY",
                          help="environment variable holding the endpoint's key (e.g. OPENAI_API_KEY); none = no key")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    evaluate.set_defaults(run=_run_eval)

    bench = commands.add_parser("bench", help="time the same job with smolalign and TRL, side by side")
    bench.add_argument("--algorithm", default="dpo", help="dpo, orpo, simpo, or a comma list")
    bench.add_argument("--model", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct); "
                                       "with --model_config, only its tokenizer is used")
    bench.add_argument("--model_config", help="random weights in a bundled architecture (smollm2-135m, "
                                              "smollm2-1.7b) or that of a config.json file")
    bench.add_argument("--dataset", default=None, help="preference pairs (default: bundled HH-RLHF)")
    bench.add_argument("--steps", type=positive_int, default=6)
    bench.add_argument("--warmup_steps", type=non_negative_int, default=0,
                       help="first steps left out of step times, tokens/s and MFU (kernel compilation)")
    bench.add_argument("--batch_size", type=positive_int, default=4)
    bench.add_argument("--max_length", type=positive_int, default=512)
    bench.add_argument("--lora", action="store_true", help="LoRA (r 16, all linear layers) instead of full fine-tuning")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--frameworks", default="smolalign,trl", help="comma list of smolalign, trl, trl_liger "
                                                                       "(TRL with use_liger_kernel=True, CUDA only)")
    bench.add_argument("--repeats", type=positive_int, default=1, help="runs per framework; the fastest is kept")
    bench.add_argument("--trl_keep_freed_memory", action="store_true",
                       help="give the TRL runs smolalign's glibc setting that keeps freed memory (CPU)")
    bench.add_argument("--output_dir", default="runs/bench")
    bench.set_defaults(run=_run_bench)

    sweep = commands.add_parser("sweep", help="train a grid of settings, then compare the runs", add_help=False)
    sweep.add_argument("--config", help="YAML file with the settings shared by every run")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a swept key and its values; repeat for a grid over several keys")
    sweep.add_argument("-h", "--help", action="store_true")
    sweep.set_defaults(run=_run_sweep)

    compare = commands.add_parser("compare", help="side-by-side report of runs: settings, metrics, curves, samples")
    compare.add_argument("runs", nargs="+", help="run folders (each with config.yaml and metrics.jsonl)")
    compare.add_argument("--output_dir", default="runs/compare", help="where report.html, report.md and plots go")
    compare.set_defaults(run=_run_compare)

    chat = commands.add_parser("chat", help="talk with a model in the terminal; --compare answers with its reference too")
    chat.add_argument("model", nargs="?", help="model folder (a run's final/, full or LoRA) or Hub id; "
                                               "default: the embedded SmolLM2-135M-Instruct")
    chat.add_argument("--compare", action="store_true",
                      help="answer each message with the policy and its reference (a LoRA adapter's base model, "
                           "the model a run started from, or --ref_model)")
    chat.add_argument("--ref_model", help="reference model for --compare (folder or Hub id)")
    chat.add_argument("--system_prompt")
    chat.add_argument("--max_new_tokens", type=positive_int, default=256)
    chat.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, help="sampling temperature (implies --do_sample); 0 = greedy")
    chat.add_argument("--top_p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--chat_template", help="'chatml' for a base model without a chat template")
    chat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat.set_defaults(run=_run_chat)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="format, counts, token lengths and problems of a dataset")
    inspect.add_argument("dataset", help="file or Hub id")
    inspect.add_argument("--model", help="tokenizer to measure lengths with (default: embedded SmolLM2)")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--max_length", type=positive_int, default=1024)
    inspect.add_argument("--max_prompt_length", type=positive_int)
    inspect.add_argument("--chat_template")
    inspect.add_argument("--system_prompt")
    inspect.set_defaults(run=_run_inspect)
    return parser


def _run_train(args, rest: list[str]) -> None:
    from smolalign.config.train import describe_keys, load_config, parse_override_args

    if args.help:
        print(TRAIN_USAGE + describe_keys())
        return
    config = load_config(args.config, parse_override_args(rest))
    from smolalign.training.loop import train

    train(config)


def _run_eval(args, rest: list[str]) -> None:
    from smolalign.evaluation.command import run_eval

    run_eval(args)


def _run_bench(args, rest: list[str]) -> None:
    from smolalign.bench.command import bench
    from smolalign.data.sources import bundled_dataset

    args.dataset = args.dataset or bundled_dataset("train")
    bench(args)


def _run_sweep(args, rest: list[str]) -> None:
    from smolalign.config.train import parse_override_args
    from smolalign.sweep import run_sweep

    if args.help:
        print("smolalign sweep --config FILE.yaml --grid KEY=V1,V2 [--grid KEY=…] [--KEY VALUE …]\n\n"
              "Trains one run per grid point into OUTPUT_DIR/KEY=VALUE,…/ (finished runs are skipped,\n"
              "interrupted ones resumed), then writes OUTPUT_DIR/report.html comparing them.")
        return
    print(f"report: {run_sweep(args.config, args.grid, parse_override_args(rest))}")


def _run_compare(args, rest: list[str]) -> None:
    from smolalign.report.write import write_report

    print(f"report: {write_report([Path(run) for run in args.runs], Path(args.output_dir))}")


def _run_chat(args, rest: list[str]) -> None:
    from smolalign.evaluation.chat import run_chat

    run_chat(args)


def _run_inspect(args, rest: list[str]) -> None:
    from smolalign.data.inspect import inspect_dataset

    print(inspect_dataset(args))


if __name__ == "__main__":
    main()
