"""smolalign: align small language models with human preferences (DPO, ORPO, SimPO, SFT)."""

__version__ = "0.1.0"
