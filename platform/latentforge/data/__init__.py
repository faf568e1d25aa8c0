"""Data sources, prepared Parquet datasets and readers (no Ray here except `ray_reader`)."""

from latentforge.data.dataset import PreparedDataset, Split
from latentforge.data.prepare import prepare_dataset

__all__ = ["PreparedDataset", "Split", "prepare_dataset"]
