"""The comparison report (`smolalign compare`), on run folders written by hand: no training needed.

The last test opens the HTML in headless Chromium, as a user would, and checks that every image loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl

from smolalign.errors import UserError
from smolalign.report.plots import curve_panels
from smolalign.report.runs import read_runs
from smolalign.report.sections import MAX_SAMPLES
from smolalign.report.write import write_report
from smolalign.stats import interval_fields

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
STEPS = 10


def make_run(
    root: Path, name: str, *, algorithm: str = "dpo", beta: float = 0.1, lora: dict | None = None,
    final_loss: float = 0.4123, evaluation: bool = True, prompts: int = 3, eval_pairs: int | None = 100,
) -> Path:
    """A run folder as `smolalign train` and `smolalign eval` leave it, with made-up but plausible numbers.

    Held-out accuracy (`eval_logps/mean_accuracy`) goes 0.52 → 0.67 over `eval_pairs` pairs; None writes
    the held-out lines of older versions, without intervals or pair count.
    """
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "algorithm": algorithm, "loss_type": "sigmoid",
              "beta": beta, "learning_rate": 5e-6, "lora": lora, "dataset": "data/train.jsonl", "seed": 42,
              "output_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    logps = -1.2 if algorithm in ("orpo", "simpo") else -120.0  # per-token means, or sums over ~100 tokens
    records = [eval_record(0, accuracy=0.5, pairs=eval_pairs, logps=logps)]
    for step in range(1, STEPS + 1):
        progress = step / STEPS
        record = {"step": step, "epoch": progress, "loss": 0.6931 + (final_loss - 0.6931) * progress,
                  "learning_rate": 5e-6 * (1 - progress), "grad_norm": 2.0 - progress, "tokens_per_second": 850.0,
                  "num_tokens": 4096 * step, "rewards/chosen": 0.2 * progress, "rewards/rejected": -0.3 * progress,
                  "rewards/accuracies": 0.5 + 0.25 * progress, "rewards/margins": 0.5 * progress,
                  "logps/chosen": logps * (1 - 0.01 * progress), "logps/rejected": logps * (1 + 0.05 * progress)}
        if algorithm == "orpo":
            record |= {"nll_loss": 2.5 - progress, "log_odds_ratio": -0.8 + progress, "log_odds_chosen": progress}
        records.append(record)
        if step % 5 == 0:
            records.append(eval_record(step, accuracy=0.5 + 0.15 * progress, pairs=eval_pairs, logps=logps))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evaluation:
        write_evaluation(run / "eval", prompts)
    return run


def eval_record(step: int, *, accuracy: float, pairs: int | None, logps: float) -> dict:
    """A held-out line as evaluate_objective writes it: accuracies with their intervals over `pairs` pairs."""
    record = {"step": step, "epoch": step / STEPS, "eval_loss": 0.69 - 0.01 * step,
              "eval_rewards/accuracies": accuracy, "eval_rewards/margins": 0.03 * step,
              "eval_logps/chosen": 0.9 * logps, "eval_logps/rejected": 1.1 * logps,
              "eval_logps/mean_accuracy": accuracy + 0.02}
    if pairs is not None:
        for name in ("eval_rewards/accuracies", "eval_logps/mean_accuracy"):
            record |= interval_fields(name, round(record[name] * pairs), pairs)
        record["eval_pairs"] = pairs
    return record


def write_evaluation(folder: Path, prompts: int) -> None:
    summary = {"rewards/accuracies": 0.6875, "rewards/margins": 0.31, "rewards/chosen": 0.12, "rewards/rejected": -0.19,
               "logps/chosen": -101.2, "logps/rejected": -117.9, "logps/mean_accuracy": 0.625, "pairs": 32, "beta": 0.1,
               "reward": "beta * (logps - ref_logps), summed over answer tokens", "kl/chosen_per_token": 0.0123,
               "judge/name": "tiny-rm", "judge/n": prompts, "judge/wins": 2, "judge/losses": 1, "judge/ties": 0,
               "judge/win_rate": 0.6667, "judge/ci_low": 0.21, "judge/ci_high": 0.94}
    (folder / "eval.json").write_text(json.dumps(summary, indent=2))
    rows = [{"index": i, "prompt": [{"role": "user", "content": f"Question {i}: is <b>bold</b> & safe?"}],
             "policy": f"Policy answer {i} from {folder.parent.name}", "policy_tokens": 7,
             "reference": f"Reference answer {i}", "reference_tokens": 4,
             "verdict": ("policy", "reference", "tie")[i % 3], "policy_score": 1.5, "reference_score": 0.25}
            for i in range(prompts)]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path / "runs", "dpo", lora={"r": 8, "lora_alpha": 16}),
            make_run(tmp_path / "runs", "orpo", algorithm="orpo", beta=0.25, final_loss=1.2345)]


def markdown_row(markdown: str, first_cell: str) -> list[str]:
    """Cells of the first Markdown table row that starts with `first_cell` (bold or not)."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].strip("*") == first_cell:
            return cells
    raise AssertionError(f"no table row starts with {first_cell!r}")


def section_of(markdown: str, title: str) -> str:
    """The Markdown of the report's section `title`, up to the next section."""
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def referenced_images(report: Path) -> list[str]:
    text = report.read_text()
    return re.findall(r'<img src="([^"]+)"', text) if report.suffix == ".html" else re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)


def test_report_compares_runs_side_by_side(tmp_path, two_runs):
    html_path = write_report(two_runs, tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    page = html_path.read_text()
    assert html_path == tmp_path / "out" / "report.html"
    for name in ("dpo", "orpo"):
        assert name in markdown and f"<th>{name}</th>" in page

    # headline: final train loss, reward accuracy/margin, held-out before and after, eval.json, judge; every
    # held-out number with its 95% Wilson interval and count (eval.json of 22/32 pairs: interval from the count)
    assert markdown_row(markdown, "orpo")[1:] == ["1.2345", "0.7500", "0.5000", "0.52 [0.42, 0.62], n=100",
                                                  "0.67 [0.57, 0.75], n=100", "0.69 [0.51, 0.82], n=32",
                                                  "0.67 [0.21, 0.94], n=3"]
    assert "| dpo | tiny-rm | 3 | 2 | 0 | 1 | 0.67 [0.21, 0.94], n=3 |" in markdown  # the judge's table

    # settings that differ are highlighted (HTML row class, Markdown bold), identical ones are not
    for key in ("algorithm", "beta", "lora.r", "output_dir"):
        assert f'<tr class="differs"><td>{key}</td>' in page
        assert markdown_row(markdown, key)[0] == f"**{key}**"
    assert markdown_row(markdown, "beta")[1:] == ["0.1", "0.25"]
    for key in ("learning_rate", "seed", "model"):
        assert f"<tr><td>{key}</td>" in page and f'<tr class="differs"><td>{key}</td>' not in page
        assert markdown_row(markdown, key)[0] == key
    assert markdown_row(markdown, "learning_rate")[1] == "5e-06"

    # final training and held-out metrics, eval.json side by side
    assert markdown_row(markdown, "loss")[1:] == ["0.4123", "1.2345"]
    assert markdown_row(markdown, "nll_loss")[1:] == ["–", "1.5000"]  # ORPO only
    assert markdown_row(markdown, "num_tokens")[1:] == ["40,960", "40,960"]
    assert markdown_row(markdown, "eval_logps/mean_accuracy")[1:] == ["0.67 [0.57, 0.75], n=100"] * 2
    assert markdown_row(markdown, "eval_rewards/accuracies")[1:] == ["0.65 [0.55, 0.74], n=100"] * 2
    assert markdown_row(markdown, "eval_pairs")[1:] == ["100", "100"]
    assert "_ci_low" not in markdown and "_ci_high" not in markdown  # folded into the accuracies' cells
    evaluation = section_of(markdown, "Held-out evaluation (smolalign eval)")  # eval.json, 22 and 20 of 32 pairs
    assert markdown_row(evaluation, "rewards/accuracies")[1:] == ["0.69 [0.51, 0.82], n=32"] * 2
    assert markdown_row(evaluation, "logps/mean_accuracy")[1:] == ["0.62 [0.45, 0.77], n=32"] * 2
    assert markdown_row(markdown, "kl/chosen_per_token")[1:] == ["0.0123", "0.0123"]

    # curves (one figure per group, ORPO's nll included), the judge chart, every image in place
    plots = {p.name for p in (tmp_path / "out" / "plots").iterdir()}
    assert {"loss.png", "accuracy.png", "margins.png", "logps.png", "learning_rate.png", "nll.png",
            "win_rates.png"} <= plots
    for report in (html_path, tmp_path / "out" / "report.md"):
        images = referenced_images(report)
        assert len(images) == len(plots)
        assert all((tmp_path / "out" / image).stat().st_size > 5000 for image in images)


def held_out_run(root: Path, name: str, *, before: tuple[int, int] | None, after: tuple[int, int],
                 rewards_after: tuple[int, int] | None = None) -> Path:
    """A run folder with only held-out lines: (pairs right, pairs) at step 0 (None: no step-0 evaluation)
    and at step 10; `rewards_after` adds the reward accuracy (DPO's implicit reward) at step 10."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "dpo"}))
    records = []
    for step, counts in ((0, before), (10, after)):
        if counts is not None:
            right, pairs = counts
            records.append({"step": step, "eval_logps/mean_accuracy": right / pairs, "eval_pairs": pairs,
                            **interval_fields("eval_logps/mean_accuracy", right, pairs)})
    if rewards_after is not None:
        right, pairs = rewards_after
        records[-1] |= {"eval_rewards/accuracies": right / pairs, **interval_fields("eval_rewards/accuracies", right, pairs)}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_the_headline_says_whether_the_effect_is_measurable(tmp_path):
    """The before/after intervals (Wilson, hand-checked numbers) decide; without a step-0 evaluation, for the
    held-out reward accuracy (DPO's implicit reward, 0 at step 0) and for eval.json, chance (0.5) does; any
    measurable part makes the run's effect measurable; without a pair count the report says it cannot tell."""
    key = "held-out `eval_logps/mean_accuracy`"
    runs = [
        make_run(tmp_path, "many-pairs", evaluation=False, eval_pairs=400),  # 208/400 → 268/400
        make_run(tmp_path, "few-pairs", evaluation=False, eval_pairs=100),  # 52/100 → 67/100
        held_out_run(tmp_path, "worse", before=(80, 100), after=(50, 100)),
        held_out_run(tmp_path, "no-step-0", before=None, after=(55, 100)),
        make_run(tmp_path, "old-version", evaluation=False, eval_pairs=None),
        make_run(tmp_path, "eval-only"),  # eval.json: 22 of 32 pairs
        make_run(tmp_path, "unevaluated", evaluation=False),
        held_out_run(tmp_path, "dpo-rewards", before=(50, 120), after=(55, 120), rewards_after=(74, 120)),
    ]
    no_held_out = [r for r in read_jsonl(runs[5] / "metrics.jsonl") if "eval_loss" not in r]
    (runs[5] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_held_out))
    shutil.rmtree(runs[6] / "eval")
    (runs[6] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_held_out))
    html_path = write_report(runs, tmp_path / "out")
    headline = section_of((tmp_path / "out" / "report.md").read_text(), "Did it work?")
    expected = [
        f"many-pairs: measurable — {key} rose from 0.52 [0.47, 0.57], n=400 to 0.67 [0.62, 0.71], n=400, and the "
        "before/after 95% intervals do not overlap; after training its interval excludes chance (0.5).",
        "few-pairs: measurable — held-out `eval_rewards/accuracies` after training is 0.65 [0.55, 0.74], n=100, "
        f"whose 95% interval excludes chance (0.5). {key} went from 0.52 [0.42, 0.62], n=100 to 0.67 [0.57, 0.75], "
        "n=100, but the before/after 95% intervals overlap; after training its interval excludes chance (0.5).",
        f"worse: measurable, for the worse — {key} fell from 0.80 [0.71, 0.87], n=100 to 0.50 [0.40, 0.60], "
        "n=100, and the before/after 95% intervals do not overlap; after training its interval includes chance (0.5).",
        f"no-step-0: not measurable — {key} after training is 0.55 [0.45, 0.64], n=100, whose 95% interval "
        "includes chance (0.5).",
        f"old-version: cannot tell whether the effect is measurable — {key} is 0.67 (n not recorded): "
        "metrics.jsonl does not record how many pairs it rests on (an older smolalign wrote it).",
        "eval-only: measurable — `smolalign eval`'s `rewards/accuracies` is 0.69 [0.51, 0.82], n=32, whose 95% "
        "interval excludes chance (0.5).",
        "unevaluated: not measured: no held-out accuracy (give the run an eval_dataset or a test_split_size, or "
        "run `smolalign eval` on its final model).",
        "dpo-rewards: measurable — held-out `eval_rewards/accuracies` after training is 0.62 [0.53, 0.70], n=120, "
        "whose 95% interval excludes chance (0.5). held-out `eval_logps/mean_accuracy` went from 0.42 [0.33, 0.51], "
        "n=120 to 0.46 [0.37, 0.55], n=120, but the before/after 95% intervals overlap; after training its interval "
        "includes chance (0.5).",
    ]
    for sentence in expected:  # each verdict's paragraph; runs with a reward accuracy add its own sentence
        assert f"\n{sentence}" in headline, sentence
    assert markdown_row(headline, "many-pairs")[4:6] == ["0.52 [0.47, 0.57], n=400", "0.67 [0.62, 0.71], n=400"]
    assert markdown_row(headline, "old-version")[4:6] == ["0.52 (n not recorded)", "0.67 (n not recorded)"]
    assert markdown_row(headline, "no-step-0")[4:6] == ["–", "0.55 [0.45, 0.64], n=100"]
    assert ("<p>many-pairs: measurable — held-out <code>eval_logps/mean_accuracy</code> rose from "
            "0.52 [0.47, 0.57], n=400") in html_path.read_text()


def test_dpo_and_orpo_log_probs_are_never_drawn_on_one_axis(tmp_path, two_runs):
    """DPO logs sums over answer tokens, ORPO per-token means: each scale gets its own panels, with the unit."""
    runs = read_runs(two_runs)
    records = {run.name: run.records for run in runs}
    panels = curve_panels(records, {run.name: run.logps_scale for run in runs})
    summed, averaged = "nats, summed over answer tokens", "nats per token, mean over answer tokens"
    assert [(p.metric, p.unit, [(c.run, c.held_out) for c in p.curves]) for p in panels["logps"]] == [
        ("logps/chosen", summed, [("dpo", False), ("dpo", True)]),
        ("logps/rejected", summed, [("dpo", False), ("dpo", True)]),
        ("logps/chosen", averaged, [("orpo", False), ("orpo", True)]),
        ("logps/rejected", averaged, [("orpo", False), ("orpo", True)]),
    ]
    # figures on one scale for all runs keep the runs overlaid on one axis
    assert [{c.run for c in p.curves} for p in panels["loss"]] == [{"dpo", "orpo"}]
    # two DPO runs: one panel per metric, both runs on it, still labelled with the unit
    same = curve_panels(records, {"dpo": "sum", "orpo": "sum"})["logps"]
    assert [(p.metric, p.unit, {c.run for c in p.curves}) for p in same] == [
        ("logps/chosen", summed, {"dpo", "orpo"}), ("logps/rejected", summed, {"dpo", "orpo"})]
    # the held-out accuracy carries its interval band, from the logged eval_…_ci_low/_ci_high
    held_out = next(c for c in panels["accuracy"][1].curves if c.run == "dpo" and c.held_out)
    assert held_out.steps == [0, 5, 10] and held_out.band[0][-1] == pytest.approx(0.5731, abs=1e-4)

    markdown = (write_report(two_runs, tmp_path / "out").parent / "report.md").read_text()
    assert (f"cannot be compared across them (dpo: {summed}; orpo: {averaged}); the log-prob figure gives each "
            "scale panels of its own.") in section_of(markdown, "Training curves")


def test_generations_are_shown_side_by_side_escaped_and_bounded(tmp_path):
    runs = [make_run(tmp_path, "a", prompts=MAX_SAMPLES + 3), make_run(tmp_path, "b", prompts=2)]
    page = write_report(runs, tmp_path / "out").read_text()
    assert page.count('<div class="sample">') == MAX_SAMPLES
    assert page.count("user: Question 0:") == 1  # the prompt once, the answers of both runs under it
    assert "Policy answer 0 from a" in page and "Policy answer 0 from b" in page
    assert page.count("Reference answer 0") == 1  # both runs share their reference: shown once
    assert "is &lt;b&gt;bold&lt;/b&gt; &amp; safe?" in page and "<b>bold</b>" not in page
    assert "judge: policy wins" in page and "judge: reference wins" in page and "7 tokens" in page
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "```text\nPolicy answer 0 from b\n```" in markdown


def test_single_run_and_missing_eval_files_are_fine(tmp_path):
    fresh = make_run(tmp_path, "fresh", evaluation=False)
    shutil.rmtree(fresh / "eval")
    page = write_report([fresh], fresh).read_text()
    markdown = (fresh / "report.md").read_text()
    assert "fresh" in page and "No eval/eval.json in fresh" in markdown
    assert markdown_row(markdown, "fresh")[1:] == ["0.4123", "0.7500", "0.5000", "0.52 [0.42, 0.62], n=100",
                                                   "0.67 [0.57, 0.75], n=100", "–", "–"]
    assert "Generations side by side" not in markdown and "Judge" not in markdown
    assert all((fresh / image).exists() for image in referenced_images(fresh / "report.html"))

    metrics_only = tmp_path / "metrics_only"
    metrics_only.mkdir()
    shutil.copy(fresh / "metrics.jsonl", metrics_only)
    assert "No run has a config.yaml." in write_report([metrics_only], tmp_path / "out").read_text()


def test_runs_sharing_a_folder_name_are_told_apart(tmp_path):
    runs = [make_run(tmp_path / "sweep-a", "dpo", evaluation=False), make_run(tmp_path / "sweep-b", "dpo")]
    markdown = (write_report(runs, tmp_path / "out").parent / "report.md").read_text()
    assert markdown_row(markdown, "setting")[1:] == ["sweep-a/dpo", "sweep-b/dpo"]


@pytest.mark.parametrize("make_folder, message", [
    (lambda root: root, "not a run folder"),
    (lambda root: root / "missing", "not a run folder"),
])
def test_a_folder_that_is_not_a_run_is_a_user_error(tmp_path, make_folder, message):
    with pytest.raises(UserError, match=message):
        write_report([make_folder(tmp_path)], tmp_path / "out")


def test_the_same_run_twice_or_a_bad_sweep_key_is_a_user_error(tmp_path):
    run = make_run(tmp_path, "dpo", evaluation=False)
    with pytest.raises(UserError, match="given twice"):
        write_report([run, tmp_path / "." / "dpo"], tmp_path / "out")
    with pytest.raises(UserError, match="sweep key 'gamma'"):
        write_report([run], tmp_path / "out", sweep_keys=["gamma"])


def test_sweep_plots_final_metrics_against_the_swept_values(tmp_path):
    runs = [make_run(tmp_path, f"beta{beta}-{loss_type}", beta=beta, final_loss=0.7 - beta)
            for beta in (0.05, 0.1, 0.5) for loss_type in ("sigmoid", "ipo")]
    for run, loss_type in zip(runs, ["sigmoid", "ipo"] * 3, strict=True):
        config = yaml.safe_load((run / "config.yaml").read_text()) | {"loss_type": loss_type}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    html_path = write_report(runs, tmp_path / "out", sweep_keys=["beta", "loss_type"])
    assert (tmp_path / "out" / "plots" / "sweep.png").stat().st_size > 5000
    assert "plots/sweep.png" in referenced_images(html_path)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown_row(markdown, "run")[1:3] == ["beta", "loss_type"]
    assert markdown_row(markdown, "beta0.5-ipo")[1:4] == ["0.5", "ipo", "0.2000"]


@pytest.mark.slow
def test_chromium_renders_the_report_with_every_image(tmp_path, two_runs):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: `make test` installs Debian's chromium and chromium-driver (as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    html_path = write_report(two_runs, tmp_path / "out")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(html_path.as_uri())
        text = driver.execute_script("return document.body.innerText")
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    finally:
        driver.quit()
    assert "Did it work?" in text and "dpo" in text and "orpo" in text
    assert len(images) == len(referenced_images(html_path)) >= 7
    assert [src for src, loaded in images if not loaded] == []
