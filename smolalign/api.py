"""The Python API: `smolalign train`, `eval`, `compare`, `sweep`, `export` and `bench` as functions, for notebooks
and scripts.

Settings have the command line's names and meanings: a config file or packaged recipe name gives the
defaults (`train("demo")`), keyword arguments override them (`beta=0.2`, `lora={"r": 8}` or
`**{"lora.r": 8}` for one nested key), and a TrainConfig object can stand in for the file. Mistakes
raise `smolalign.errors.UserError` with the sentence the CLI prints; a run that had to stop raises
`RunError`. Each function returns a result object (smolalign/results.py) that shows the numbers and
curves in a notebook. Heavy modules (torch, transformers) are imported when a function runs, so
`import smolalign` stays quick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smolalign.config.commands import (
        BenchConfig,
        EvalConfig,
        ExportBenchConfig,
        GenerationBenchConfig,
        QualityConfig,
    )
    from smolalign.config.train import TrainConfig
    from smolalign.results import ComparisonResult, EvalResult, TrainResult

log = logging.getLogger("smolalign")


def train(config: str | Path | TrainConfig | None = None, **settings: Any) -> TrainResult:
    """Train one run, as `smolalign train --config CONFIG --KEY VALUE …`; returns its TrainResult.

    `config` is a YAML file, a packaged recipe's name (`"demo"`), a TrainConfig, or None for the
    defaults; `settings` are config keys (`smolalign train --help` lists them) that override it.
    Writes the run folder (`output_dir`) with its final model and report.html, and with
    `push_to_hub=True` uploads them.
    """
    from smolalign.errors import writes_reported
    from smolalign.report.write import write_report
    from smolalign.results import TrainResult
    from smolalign.run_folder import RunFolder
    from smolalign.training.loop import run_training
    from smolalign.training.push import push_run

    run_config = train_config(config, **settings)
    run_dir = Path(run_config.output_dir)
    with _quiet_libraries():
        finished = run_training(run_config) is not None  # in the process that saved final/ (the main one)
    if finished:
        with writes_reported(RunFolder(run_dir).report_html):
            log.info("report: %s", write_report([run_dir], run_dir))
        if run_config.export_gguf:
            _export_final(run_dir, run_config)
        if run_config.push_to_hub:  # after the report, which goes up with the model
            log.info("pushed to the Hub: %s", push_run(run_dir, run_config))
    return TrainResult(run_dir)


def _export_final(run_dir: Path, config: TrainConfig) -> Path:
    """final/ as a GGUF file beside it (`export_gguf`); a failure says the run itself is complete."""
    from smolalign.errors import RunError, UserError
    from smolalign.gguf_export.gguf import export_gguf
    from smolalign.run_folder import RunFolder

    name = config.run_name or run_dir.resolve().name
    try:
        return export_gguf(RunFolder(run_dir).final, run_dir / f"{name}-{config.export_gguf}.gguf",
                           quantization=config.export_gguf)
    except (UserError, RunError) as error:
        raise RunError(f"the run is complete in '{run_dir}', but its GGUF export failed: {error}") from None


def train_config(config: str | Path | TrainConfig | None = None, **settings: Any) -> TrainConfig:
    """The TrainConfig that `train(config, **settings)` would run, validated (a mistake raises UserError)."""
    from smolalign.config.train import TrainConfig, load_config

    return load_config(config if config is None or isinstance(config, TrainConfig) else _plain(config), _plain(settings))


def evaluate(config: EvalConfig | None = None, **settings: Any) -> EvalResult:
    """Score held-out pairs with a model and its reference, as `smolalign eval --model M --dataset D …`.

    `settings` are the command's options (`model` and `dataset` are required; `smolalign eval --help`
    lists the others), over an EvalConfig when one is given. Writes eval.json, eval_pairs.jsonl and,
    with `generate=N`, generations.jsonl into `output_dir` (default: RUN/eval for a run's RUN/final,
    where the run's TrainResult and `compare` find them); returns an EvalResult.
    """
    from smolalign.config.commands import EvalConfig
    from smolalign.errors import UserError
    from smolalign.evaluation.command import default_output_dir, run_eval
    from smolalign.results import EvalResult

    if config is not None and not isinstance(config, EvalConfig):
        raise UserError(f"evaluate takes an EvalConfig or keyword settings (model=…, dataset=…), not {config!r}.")
    values = {**(config.to_dict() if config is not None else {}), **_plain(settings)}
    eval_config = EvalConfig.from_values(values)
    with _quiet_libraries():
        run_eval(eval_config)
    return EvalResult(eval_config.output_dir or default_output_dir(eval_config.model), eval_config.model)


def compare(*runs: str | Path | TrainResult, output_dir: str | Path = "runs/compare") -> ComparisonResult:
    """Compare run folders (or TrainResults) side by side, as `smolalign compare RUN … --output_dir DIR`.

    Writes report.html, report.md and plots/ into `output_dir`; returns a ComparisonResult, which shows
    the report inline in a notebook.
    """
    from smolalign.errors import UserError
    from smolalign.report.write import write_report
    from smolalign.results import ComparisonResult

    if not runs:
        raise UserError("compare needs at least one run folder.")
    run_dirs = [Path(run) for run in runs]
    return ComparisonResult(write_report(run_dirs, Path(output_dir)), run_dirs)


def sweep(
    config: str | Path | TrainConfig | None = None, *, grid: Mapping[str, Sequence] | Sequence[str],
    **settings: Any,
) -> ComparisonResult:
    """Train one run per point of `grid`, then compare them, as `smolalign sweep --grid KEY=V1,V2 …`.

    `grid` maps keys to the values to try (`{"beta": [0.05, 0.1, 0.5]}`; several keys make a grid), or
    holds the CLI's `"KEY=V1,V2"` strings. Runs go to `output_dir/KEY=VALUE,…/`; finished ones are
    skipped and interrupted ones resumed, as on the command line. Returns the comparison of all runs.
    """
    from smolalign.config.train import TrainConfig
    from smolalign.report.write import write_report
    from smolalign.results import ComparisonResult
    from smolalign.training.grid import plan_sweep, run_config

    settings = _plain(settings)
    base = config if config is None or isinstance(config, TrainConfig) else os.fspath(config)
    specs = [f"{key}={','.join(map(str, values))}" for key, values in grid.items()] if isinstance(
        grid, Mapping) else list(grid)
    plan = plan_sweep(base, specs, settings)
    for number, (folder, point) in enumerate(plan.points, start=1):
        run = run_config(base, settings, folder, point, number=number, total=len(plan.points))
        if run is not None:
            train(run)
    report = write_report(plan.run_dirs, plan.root, sweep_keys=list(plan.grid))
    return ComparisonResult(report, plan.run_dirs)


def export(model: str | Path | TrainResult | None = None, output: str | Path = "model.gguf", *,
           quantization: str = "q8_0") -> Path:
    """Write `model` as one GGUF file for llama.cpp, Ollama and LM Studio, as `smolalign export MODEL --output
    FILE.gguf`: a run (its folder or TrainResult: its final/; a LoRA adapter is merged into its base), any model
    folder or Hub id, or None for the embedded SmolLM2-135M-Instruct. Returns the file's path."""
    from smolalign.config.commands import ExportConfig
    from smolalign.gguf_export.gguf import export_gguf

    config = ExportConfig.from_values({"model": _plain(model), "output": _plain(output), "quantization": quantization})
    with _quiet_libraries():
        return export_gguf(config.model, config.output, quantization=config.quantization)


def bench(config: BenchConfig | QualityConfig | GenerationBenchConfig | ExportBenchConfig) -> Path:
    """Run the bench a config is for (`smolalign bench speed | quality | generation | export`); returns the folder
    its tables and plots went to."""
    from smolalign.bench.benches import run_bench

    with _quiet_libraries():
        return run_bench(config)


@contextlib.contextmanager
def _quiet_libraries():
    """While a command runs, as on the command line: no deprecation notes from the libraries below, and no
    bars of transformers' own (loading and saving weights); smolalign's bars show the long work. The
    caller's settings are restored afterwards."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars_on = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars_on:
            transformers_logging.enable_progress_bar()


def _plain(value: Any) -> Any:
    """Paths as text, in nested settings too: a config holds strings, as YAML and flags give them."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
