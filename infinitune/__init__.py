"""infinitune: distributed instruction fine-tuning (Ray Train + DeepSpeed ZeRO-3 + WebDataset)."""

from infinitune.version import __version__

__all__ = ["__version__"]
