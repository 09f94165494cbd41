"""`smolalign bench export`: the size of each GGUF quantization of the embedded model, and how often each file
predicts the float model's next token (read back by transformers' GGUF loader)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from smolalign.config.commands import ExportBenchConfig
from smolalign.gguf_export.report import export_report

log = logging.getLogger("smolalign")


def export_bench(config: ExportBenchConfig) -> list[dict]:
    """Export, measure, and write export.json and export.md into the output folder."""
    output = Path(config.output_dir)
    rows = export_report(output, quantizations=config.quantization, texts=config.texts, max_tokens=config.max_tokens)
    (output / "export.json").write_text(json.dumps(rows, indent=2))
    positions = rows[0]["positions"]
    lines = [f"The embedded SmolLM2-135M-Instruct as GGUF; top-1 agreement with the float model over {positions} "
             f"positions ({config.texts} held-out HH-RLHF conversations x {config.max_tokens} tokens).", "",
             "| quantization | file size (MB) | top-1 agreement |", "|---|---|---|"]
    lines += [f"| {row['quantization']} | {row['bytes'] / 1e6:.1f} | {row['top1_agreement']:.1%} |" for row in rows]
    (output / "export.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s and export.json", output / "export.md")
    return rows
