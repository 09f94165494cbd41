"""smolalign: align small language models with human preferences (DPO, ORPO, SimPO, SFT).

The commands as Python functions, for notebooks and scripts (smolalign/api.py):

    import smolalign
    dpo = smolalign.train("demo", beta=0.2, output_dir="runs/dpo")   # a recipe, a YAML file or keywords
    smolalign.evaluate(model=dpo.final_model, dataset="hh-rlhf-harmless", max_pairs=64)
    smolalign.compare(dpo, "runs/orpo", output_dir="runs/compare")
    smolalign.export(dpo, "dpo.gguf", quantization="q8_0")          # for llama.cpp, Ollama, LM Studio
"""

from smolalign.api import bench, compare, evaluate, export, sweep, train
from smolalign.errors import RunError, UserError

__version__ = "0.1.0"
__all__ = ["RunError", "UserError", "bench", "compare", "evaluate", "export", "sweep", "train"]
