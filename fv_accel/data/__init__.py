"""Latent datasets (FastVideo parquet schemas), stateful distributed loading, and the toy world."""

from fv_accel.data.dataset import LatentBatch, LatentSample, ParquetLatentDataset, collate_latents
from fv_accel.data.loader import DataStream, build_data_stream

__all__ = ["DataStream", "LatentBatch", "LatentSample", "ParquetLatentDataset", "build_data_stream",
           "collate_latents"]
