"""`smolalign bench quality`: does each preference method align the model, at the same budget?

Every method trains from the same model on the same pairs for the same steps (the recipe, `quality` by
default), with its own loss settings on top (`METHOD_SETTINGS`). `smolalign eval` then scores each final
model on the same held-out pairs: implicit-reward accuracy against the starting model, mean-log-prob
accuracy (also measured for the starting model: the "before"), per-token KL from the starting model and
chosen-answer perplexity. Every accuracy has its 95% interval and pair count.

With `judge_prompts` > 0, a reward model is trained on the same pairs (`--algorithm reward`). It judges each
method's greedy answers to held-out prompts against the starting model's answers, and the table gives the
win rate with its interval. The reward model's own held-out accuracy is reported next to it, so the
judge's quality is visible.

Writes quality.json, quality.md and quality.png. A rerun skips finished work: a run whose final/ exists
with the same settings (as a sweep does), and an evaluation already done with the same settings.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from smolalign.config.commands import EvalConfig, QualityConfig
from smolalign.config.train import TrainConfig, load_config
from smolalign.errors import UserError
from smolalign.evaluation.command import run_eval
from smolalign.models.loading import model_source
from smolalign.report.plots import plot_quality
from smolalign.report.verdicts import chance_label, win_rate
from smolalign.run_folder import RunFolder
from smolalign.stats import Proportion
from smolalign.training.grid import run_config
from smolalign.training.loop import run_training

log = logging.getLogger("smolalign")

# Each method's loss settings, on top of the recipe's shared budget. IPO is DPO's `ipo` loss; ORPO's beta is
# its lambda; SimPO's beta 2.0 lies in the range its paper recommends (2.0-2.5), with TRL's gamma 0.5.
METHOD_SETTINGS = {
    "dpo": {"algorithm": "dpo", "loss_type": "sigmoid", "beta": 0.1},
    "ipo": {"algorithm": "dpo", "loss_type": "ipo", "beta": 0.1},
    "orpo": {"algorithm": "orpo", "beta": 0.1},
    "simpo": {"algorithm": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
    "kto": {"algorithm": "kto", "beta": 0.1},  # the same pairs, unpaired into desirable and undesirable rows
}
JUDGE = "reward"  # the reward model's run folder under output_dir
STARTING_MODEL = "start"  # the starting model's evaluation folder


@dataclass
class Evaluated:
    """One model's held-out numbers (its eval.json) and what they cost."""

    name: str
    summary: dict
    train_seconds: float | None  # None: the starting model, or a run finished before timings were kept
    eval_seconds: float

    def accuracy(self, key: str) -> Proportion | None:
        return Proportion.read(self.summary, key, n_key="pairs")

    @property
    def win_rate(self) -> Proportion | None:
        return win_rate(self.summary)


@dataclass
class TrainedJudge:
    model: Path
    accuracy: Proportion | None  # the reward model's own held-out accuracy
    train_seconds: float | None


def quality_bench(config: QualityConfig) -> dict:
    """Train and evaluate every method of `config` (and the judge); writes quality.json, .md and .png."""
    recipe = load_config(config.recipe, {"device": config.device})
    if recipe.eval_dataset is None:
        raise UserError(f"the recipe '{config.recipe}' names no eval_dataset: the quality bench needs held-out "
                        "pairs that training never sees.")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    total = len(config.algorithm) + bool(config.judge_prompts)
    judge = train_judge(config, output, total) if config.judge_prompts else None
    start = evaluate_method(config, recipe, output / STARTING_MODEL, model=model_source(recipe.model), judge=None,
                            train_seconds=None)
    methods = []
    for number, method in enumerate(config.algorithm, start=1 + bool(judge)):
        settings = {**METHOD_SETTINGS[method], "eval_dataset": None}  # scored once, by eval, after training
        seconds = train_run(config, output / method, settings, number=number, total=total)
        methods.append(evaluate_method(config, recipe, output / method, model=str(RunFolder(output / method).final),
                                       judge=judge, train_seconds=seconds))
    result = summarise(config, recipe, start, methods, judge)
    (output / "quality.json").write_text(json.dumps(result, indent=2))
    (output / "quality.md").write_text(result["markdown"])
    plot_quality({m.name: _plotted(m) for m in methods}, _plotted(start), output / "quality.png")
    print(result["markdown"])
    return result


def train_run(config: QualityConfig, folder: Path, settings: dict, *, number: int, total: int) -> float | None:
    """Train one run of the recipe with `settings` (skipped when finished earlier); its seconds, kept in
    the folder so that a rerun still reports them."""
    timing = folder / "train_seconds.json"
    run = run_config(config.recipe, {"device": config.device}, folder, settings, number=number, total=total)
    if run is None:
        return json.loads(timing.read_text()) if timing.exists() else None
    start = time.perf_counter()
    run_training(run)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps(seconds))
    return seconds


def train_judge(config: QualityConfig, output: Path, total: int) -> TrainedJudge:
    """The reward model trained on the recipe's pairs, with its accuracy on `eval_pairs` held-out pairs."""
    folder = output / JUDGE
    seconds = train_run(config, folder, {"algorithm": "reward", "max_eval_pairs": config.eval_pairs},
                        number=1, total=total)
    run = RunFolder(folder)
    held_out = [r for r in run.read_metrics() if "eval_accuracy" in r]
    accuracy = Proportion.read(held_out[-1], "eval_accuracy", n_key="eval_pairs") if held_out else None
    log.info("judge: %s, held-out accuracy %s", run.final, accuracy)
    return TrainedJudge(run.final, accuracy, seconds)


def evaluate_method(config: QualityConfig, recipe: TrainConfig, folder: Path, *, model: str,
                    judge: TrainedJudge | None, train_seconds: float | None) -> Evaluated:
    """`smolalign eval` of `model` on the held-out pairs into FOLDER/eval (skipped when done earlier with
    the same settings); the starting model is scored without a reference, at the recipe's lengths."""
    settings = {"model": model, "dataset": recipe.eval_dataset, "split": recipe.eval_split,
                "max_pairs": config.eval_pairs, "output_dir": str(RunFolder(folder).eval.path), "device": config.device,
                "max_length": recipe.max_length, "max_prompt_length": recipe.max_prompt_length,
                "chat_template": recipe.chat_template, "system_prompt": recipe.system_prompt}
    if judge is not None:
        settings.update(generate=config.judge_prompts, max_new_tokens=config.max_new_tokens, judge=str(judge.model))
    done = RunFolder(folder).eval.path / "quality_eval.json"  # the bench's own record beside eval.json
    earlier = json.loads(done.read_text()) if done.exists() else {}
    if earlier.get("settings") == settings:
        log.info("%s: evaluated earlier, skipped", folder.name)
        return Evaluated(folder.name, earlier["summary"], train_seconds, earlier["seconds"])
    start = time.perf_counter()
    summary = run_eval(EvalConfig.from_values(settings))
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"settings": settings, "summary": summary, "seconds": seconds}, indent=2))
    return Evaluated(folder.name, summary, train_seconds, seconds)


def verdict(accuracy: Proportion | None) -> str:
    """Whether held-out implicit-reward accuracy beats a coin flip, in the report's words."""
    return chance_label(accuracy) if accuracy is not None and accuracy.has_interval else "not measured"


def summarise(config: QualityConfig, recipe: TrainConfig, start: Evaluated, methods: list[Evaluated],
              judge: TrainedJudge | None) -> dict:
    """quality.json's content, with the markdown table people read."""
    pairs = f"{recipe.max_train_pairs} pairs" if recipe.max_train_pairs else "all pairs"
    lines = [
        f"{recipe.model or 'the embedded SmolLM2-135M-Instruct'}, {'LoRA' if recipe.lora else 'full fine-tuning'}: "
        f"{pairs} of {recipe.dataset}, {recipe.num_train_epochs:g} epoch(s) in batches of "
        f"{recipe.per_device_train_batch_size}, lr {recipe.learning_rate:g} {recipe.lr_scheduler_type}, max_length "
        f"{recipe.max_length}; held-out: {start.summary['pairs']} pairs of {recipe.eval_dataset} "
        f"({recipe.eval_split}). Accuracies and win rates: value [95% interval], n.",
        "",
        "| method | settings | implicit-reward accuracy | effect | mean-log-prob accuracy | KL/token | "
        "chosen perplexity | judge win rate | train (s) | eval (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| starting model | | | | {start.accuracy('logps/mean_accuracy')} | 0 | "
        f"{start.summary['perplexity/chosen']:.2f} | | | {start.eval_seconds:.0f} |",
    ]
    rows = []
    for m in methods:
        implicit = m.accuracy("rewards/accuracies")
        settings = ", ".join(f"{k} {v}" for k, v in METHOD_SETTINGS[m.name].items() if k != "algorithm")
        row = {"method": m.name, "settings": METHOD_SETTINGS[m.name], "verdict": verdict(implicit),
               "train_seconds": m.train_seconds, "eval_seconds": m.eval_seconds, "eval": m.summary}
        rows.append(row)
        lines.append(f"| {m.name} | {settings} | {implicit} | {row['verdict']} | "
                     f"{m.accuracy('logps/mean_accuracy')} | {m.summary['kl/chosen_per_token']:.3f} | "
                     f"{m.summary['perplexity/chosen']:.2f} | {m.win_rate or ''} | "
                     f"{_seconds(m.train_seconds)} | {m.eval_seconds:.0f} |")
    lines += ["", "Implicit reward: beta x (log-prob under the model - under the starting model), summed over the "
              "answer; its accuracy is the share of held-out pairs where the chosen answer's is higher (the DPO "
              "family optimises it; for ORPO and SimPO it measures the same log-ratio). Mean-log-prob accuracy "
              "asks the same of the model alone, with mean token log-probs. KL and perplexity: on the chosen "
              "answers."]
    if judge is not None:
        lines += ["", f"Judge: a reward model trained by `--algorithm reward` on the same pairs and budget "
                      f"({_seconds(judge.train_seconds)} s); its held-out accuracy: {judge.accuracy}. Win rate: the "
                      f"share of {config.judge_prompts} held-out prompts whose greedy answer (at most "
                      f"{config.max_new_tokens} tokens) it scores above the starting model's; a tie counts half."]
    return {"recipe": recipe.to_dict(), "rows": rows, "starting_model": start.summary,
            "judge": None if judge is None else {"model": str(judge.model), "accuracy": _plain(judge.accuracy),
                                                 "train_seconds": judge.train_seconds},
            "markdown": "\n".join(lines) + "\n"}


def _plotted(evaluated: Evaluated) -> dict[str, Proportion | float | None]:
    return {"implicit-reward accuracy": evaluated.accuracy("rewards/accuracies") if evaluated.name != STARTING_MODEL
            else None,
            "mean-log-prob accuracy": evaluated.accuracy("logps/mean_accuracy"),
            "judge win rate": evaluated.win_rate,
            "KL per token (chosen)": evaluated.summary.get("kl/chosen_per_token", 0.0)}


def _plain(proportion: Proportion | None) -> dict | None:
    return None if proportion is None else vars(proportion)


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"
