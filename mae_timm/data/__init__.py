"""The data path: sources -> WebDataset shards -> streaming loader (decode only) -> device-side augmentation.

See docs/data.md. Independent of the models: nothing here imports ``mae_timm.models``.
"""

from mae_timm.data.decode import center_crop, decode_sample
from mae_timm.data.gpu_aug import GpuAugment, random_resized_crop_boxes
from mae_timm.data.hf_dataset import hf_dataset
from mae_timm.data.loader import ShardLoader, create_loader
from mae_timm.data.shard_index import index_shards
from mae_timm.data.shard_set import resolve_shards, shards_for_reader
from mae_timm.data.shards import file_digest, read_info, write_shards, write_source
from mae_timm.data.sources import DataError, Sample, SampleList, SourceData, fashion_mnist, imagefolder, read_idx
from mae_timm.data.tiny_imagenet import TINY_IMAGENET_MD5, TINY_IMAGENET_URL, download, tiny_imagenet

__all__ = [
    "TINY_IMAGENET_MD5",
    "TINY_IMAGENET_URL",
    "DataError",
    "GpuAugment",
    "Sample",
    "SampleList",
    "ShardLoader",
    "SourceData",
    "center_crop",
    "create_loader",
    "decode_sample",
    "download",
    "fashion_mnist",
    "hf_dataset",
    "file_digest",
    "imagefolder",
    "index_shards",
    "random_resized_crop_boxes",
    "read_idx",
    "read_info",
    "resolve_shards",
    "shards_for_reader",
    "tiny_imagenet",
    "write_shards",
    "write_source",
]
