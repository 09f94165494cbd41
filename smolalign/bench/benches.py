"""`smolalign bench speed | quality | generation | export`: the bench a config is for."""

from __future__ import annotations

from pathlib import Path

from smolalign.config.commands import BenchConfig, ExportBenchConfig, GenerationBenchConfig, QualityConfig


def run_bench(config: BenchConfig | QualityConfig | GenerationBenchConfig | ExportBenchConfig) -> Path:
    """Run the bench of `config`; returns its output folder."""
    if isinstance(config, QualityConfig):
        from smolalign.bench.quality import quality_bench

        quality_bench(config)
    elif isinstance(config, GenerationBenchConfig):
        from smolalign.bench.generation import generation_bench

        generation_bench(config)
    elif isinstance(config, ExportBenchConfig):
        from smolalign.bench.export import export_bench

        export_bench(config)
    else:
        from smolalign.bench.command import bench

        bench(config)
    return Path(config.output_dir)
