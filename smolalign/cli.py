"""`smolalign` command line: train, eval, compare, sweep, bench, chat, data inspect.

User mistakes end with one sentence on stderr and exit status 2, a run that had to stop (non-finite
losses, a failed save) with one sentence and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings

from smolalign.config.arguments import add_config_arguments, config_from_args
from smolalign.config.commands import (
    BenchConfig,
    ChatConfig,
    EvalConfig,
    GenerationBenchConfig,
    InspectConfig,
    QualityConfig,
)
from smolalign.errors import RunError, UserError

log = logging.getLogger("smolalign")

TRAIN_USAGE = """smolalign train [--config FILE.yaml] [--KEY VALUE ...]

Defaults come from the dataclass, then the YAML file, then --KEY VALUE flags (nested keys as
--lora.r 8). Keys:
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        if args.command == "compare" and rest:
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

    evaluate = commands.add_parser("eval", help="held-out preference accuracy, drift, generations and a judge's win rate",
                                   allow_abbrev=False)
    add_config_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(run=_run_eval)

    bench = commands.add_parser("bench", help="time the same job with smolalign and TRL, side by side; --quality: "
                                "the methods' held-out quality at one budget; --generation: generation speed",
                                allow_abbrev=False)
    add_config_arguments(bench, BenchConfig)
    bench.add_argument("--quality", action="store_true", help="Instead of speed: train DPO, IPO, ORPO and SimPO at "
                       "one budget, evaluate each on held-out pairs, judge them with a reward model.")
    bench.add_argument("--generation", action="store_true", help="Instead of training speed: time greedy answers "
                       "from transformers' one-prompt loop and from smolalign's batched generation.")
    quality = bench.add_argument_group("with --quality", "algorithm (default: dpo,ipo,orpo,simpo), device and "
                                       "output_dir (default: runs/quality) apply too")
    add_config_arguments(quality, QualityConfig, skip=_field_names(BenchConfig))
    generation = bench.add_argument_group("with --generation", "model, dataset (its prompts), device, max_new_tokens "
                                          "(default: 64) and output_dir (default: runs/generation) apply too")
    add_config_arguments(generation, GenerationBenchConfig,
                         skip=_field_names(BenchConfig) | _field_names(QualityConfig))
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

    chat = commands.add_parser("chat", help="talk with a model in the terminal; --compare answers with its reference too",
                               allow_abbrev=False)
    add_config_arguments(chat, ChatConfig)
    chat.set_defaults(run=_run_chat)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="format, counts, token lengths and problems of a dataset",
                                       allow_abbrev=False)
    add_config_arguments(inspect, InspectConfig)
    inspect.set_defaults(run=_run_inspect)
    return parser


def _run_train(args, rest: list[str]) -> None:
    from smolalign.api import train
    from smolalign.config.fields import parse_override_args
    from smolalign.config.train import describe_keys

    if args.help:
        print(TRAIN_USAGE + describe_keys())
        return
    train(args.config, **parse_override_args(rest))


def _run_eval(args, rest: list[str]) -> None:
    from smolalign.api import evaluate
    from smolalign.core.heldout import format_summary_table

    config = config_from_args(EvalConfig, args, rest)
    result = evaluate(config)
    summary = result.summary
    print(f"{config.model} on {config.dataset} ({summary['pairs']} pairs):\n{format_summary_table(summary)}")
    print(f"wrote {result.output_dir}/eval.json, eval_pairs.jsonl" + (", generations.jsonl" if config.generate else ""))


# The benches of `smolalign bench`: the training speed bench, or the one its flag names.
BENCH_MODES = {"quality": QualityConfig, "generation": GenerationBenchConfig}


def _run_bench(args, rest: list[str]) -> None:
    """The speed bench, or the bench --quality or --generation names; a flag of another bench is refused."""
    modes = [mode for mode in BENCH_MODES if getattr(args, mode)]
    if len(modes) > 1:
        raise UserError("--quality and --generation are two benches: run one at a time.")
    chosen = BENCH_MODES[modes[0]] if modes else BenchConfig
    for flag in sorted(vars(args)):
        owners = [cls for cls in (BenchConfig, *BENCH_MODES.values()) if flag in _field_names(cls)]
        if owners and chosen not in owners:
            if owners[0] is BenchConfig:
                raise UserError(f"--{flag} belongs to the speed bench: leave out --{modes[0]} or the flag.")
            raise UserError(f"--{flag} belongs to {owners[0].command}: add {owners[0].command.split()[1]}.")
    config = config_from_args(chosen, args, rest)
    if chosen is QualityConfig:
        from smolalign.bench.quality import quality_bench

        quality_bench(config)
    elif chosen is GenerationBenchConfig:
        from smolalign.bench.generation import generation_bench

        generation_bench(config)
    else:
        from smolalign.bench.command import bench

        bench(config)


def _field_names(cls) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(cls))


def _run_sweep(args, rest: list[str]) -> None:
    from smolalign.api import sweep
    from smolalign.config.fields import parse_override_args

    if args.help:
        print("smolalign sweep --config FILE.yaml --grid KEY=V1,V2 [--grid KEY=…] [--KEY VALUE …]\n\n"
              "Trains one run per grid point into OUTPUT_DIR/KEY=VALUE,…/ (finished runs are skipped,\n"
              "interrupted ones resumed), then writes OUTPUT_DIR/report.html comparing them.")
        return
    print(f"report: {sweep(args.config, grid=args.grid, **parse_override_args(rest)).report}")


def _run_compare(args, rest: list[str]) -> None:
    from smolalign.api import compare

    print(f"report: {compare(*args.runs, output_dir=args.output_dir).report}")


def _run_chat(args, rest: list[str]) -> None:
    from smolalign.evaluation.chat import run_chat

    run_chat(config_from_args(ChatConfig, args, rest))


def _run_inspect(args, rest: list[str]) -> None:
    from smolalign.data.inspect import inspect_dataset

    print(inspect_dataset(config_from_args(InspectConfig, args, rest)))


if __name__ == "__main__":
    main()
