"""`smolalign` command line: train, sweep, eval, compare, chat, export, data inspect, bench speed | quality |
generation | export.

Every command reads its flags one way: a flag per field of its config dataclass (config/arguments.py), and
flags argparse does not know (`--lora.r 8`, TRL's and LLaMA-Factory's names for `train`) as `--key value`
config keys, checked by the same rules as config files. User mistakes end with one sentence on stderr and
exit status 2, a run that had to stop (non-finite losses, a failed save) with one sentence and exit status
1; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings

from smolalign.config.arguments import add_config_arguments, config_from_args, given_values
from smolalign.config.commands import (
    BenchConfig,
    ChatConfig,
    EvalConfig,
    ExportBenchConfig,
    ExportConfig,
    GenerationBenchConfig,
    InspectConfig,
    QualityConfig,
)
from smolalign.config.fields import parse_override_args
from smolalign.config.train import TrainConfig
from smolalign.errors import RunError, UserError

log = logging.getLogger("smolalign")

BENCHES = {"speed": BenchConfig, "quality": QualityConfig, "generation": GenerationBenchConfig,
           "export": ExportBenchConfig}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    parser = _parser()
    try:
        args, rest = parser.parse_known_args(_bench_subcommand(argv))
        if getattr(args, "run", None) is None:
            parser.print_help()
            sys.exit(2)
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


def _bench_subcommand(argv: list[str]) -> list[str]:
    """`bench --quality` and `bench --generation`, and `bench` alone for the speed bench, as the subcommands
    that replace them (with a note; the old forms go in the next release)."""
    if argv[:1] != ["bench"] or (len(argv) > 1 and argv[1] in (*BENCHES, "-h", "--help")):
        return argv
    mode = next((flag[2:] for flag in ("--quality", "--generation") if flag in argv[1:]), "speed")
    if mode != "speed" and {"--quality", "--generation"} <= set(argv):
        raise UserError("--quality and --generation are two benches: run `smolalign bench quality` or "
                        "`smolalign bench generation`.")
    log.warning("`smolalign bench%s` is now `smolalign bench %s`; the old form goes in the next release",
                f" --{mode}" if mode != "speed" else "", mode)
    return ["bench", mode, *(arg for arg in argv[1:] if arg != f"--{mode}")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolalign", description="Align small language models with preferences.")
    commands = parser.add_subparsers(dest="command")

    def command(name: str, help: str, run, config=None, **options) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, allow_abbrev=False, **options)
        if config is not None:
            add_config_arguments(sub, config)
        sub.set_defaults(run=run)
        return sub

    train = command("train", "train a model: DPO and its loss types, KTO, ORPO, SimPO, SFT, or a reward model",
                    _run_train)
    train.add_argument("--config", help="YAML file or packaged recipe: smolalign's keys, or those of TRL, the "
                                        "alignment-handbook or LLaMA-Factory")
    add_config_arguments(train, TrainConfig)

    sweep = command("sweep", "train a grid of settings, then compare the runs", _run_sweep)
    sweep.add_argument("--config", help="YAML file or packaged recipe with the settings shared by every run")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a swept key and its values; repeat for a grid over several keys")
    add_config_arguments(sweep, TrainConfig)

    command("eval", "held-out preference accuracy, drift, generations and a judge's win rate", _run_eval, EvalConfig)
    compare = command("compare", "side-by-side report of runs: settings, metrics, curves, samples", _run_compare)
    compare.add_argument("runs", nargs="+", help="run folders (each with config.yaml and metrics.jsonl)")
    compare.add_argument("--output_dir", default="runs/compare", help="where report.html, report.md and plots go")
    command("chat", "talk with a model in the terminal; --compare answers with its reference too", _run_chat,
            ChatConfig)
    command("export", "write a model as a GGUF file for llama.cpp, Ollama and LM Studio", _run_export, ExportConfig)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", help="format, counts, token lengths and problems of a dataset",
                              allow_abbrev=False)
    add_config_arguments(inspect, InspectConfig)
    inspect.set_defaults(run=_run_inspect)

    benches = commands.add_parser("bench", help="speed and memory against TRL, quality of the methods, generation "
                                                "speed, GGUF exports").add_subparsers(dest="bench")
    for name, config in BENCHES.items():
        sub = benches.add_parser(name, help=config.__doc__.splitlines()[0], allow_abbrev=False)
        add_config_arguments(sub, config)
        sub.set_defaults(run=_run_bench, bench_config=config)
    return parser


def _train_settings(args: argparse.Namespace, rest: list[str]) -> dict:
    """The config keys the command line gave: TrainConfig's flags and any other `--key value`."""
    return {**given_values(TrainConfig, args), **parse_override_args(rest)}


def _run_train(args, rest: list[str]) -> None:
    from smolalign.api import train

    train(args.config, **_train_settings(args, rest))


def _run_sweep(args, rest: list[str]) -> None:
    from smolalign.api import sweep

    print(f"report: {sweep(args.config, grid=args.grid, **_train_settings(args, rest)).report}")


def _run_eval(args, rest: list[str]) -> None:
    from smolalign.api import evaluate
    from smolalign.core.heldout import format_summary_table

    config = config_from_args(EvalConfig, args, rest)
    result = evaluate(config)
    summary = result.summary
    print(f"{config.model} on {config.dataset} ({summary['pairs']} pairs):\n{format_summary_table(summary)}")
    print(f"wrote {result.output_dir}/eval.json, eval_pairs.jsonl" + (", generations.jsonl" if config.generate else ""))


def _run_bench(args, rest: list[str]) -> None:
    from smolalign.api import bench

    bench(config_from_args(args.bench_config, args, rest))


def _run_compare(args, rest: list[str]) -> None:
    from smolalign.api import compare

    print(f"report: {compare(*args.runs, output_dir=args.output_dir).report}")


def _run_chat(args, rest: list[str]) -> None:
    from smolalign.evaluation.chat import run_chat

    run_chat(config_from_args(ChatConfig, args, rest))


def _run_export(args, rest: list[str]) -> None:
    from smolalign.api import export

    config = config_from_args(ExportConfig, args, rest)
    print(export(**dataclasses.asdict(config)))


def _run_inspect(args, rest: list[str]) -> None:
    from smolalign.data.inspect import inspect_dataset

    print(inspect_dataset(config_from_args(InspectConfig, args, rest)))


if __name__ == "__main__":
    main()
