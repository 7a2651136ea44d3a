"""Datasets: the CIFAR-10/100 archives (restricted unpickling, checksums), image files and class folders, the
content-hashed validation split, and batch augmentation on uint8 images.

May import: errors.
"""

from .datasets import (
    DATASETS,
    Dataset,
    DataWarning,
    Split,
    augment,
    batches,
    content_checksum,
    default_cache_dir,
    get_split,
    image_extensions,
    image_ids,
    is_image_file,
    load_cifar,
    load_image_files,
    load_image_folder,
    resolve_data_dir,
    train_val_split,
)
from .inputs import Inputs, inputs_from_folder

__all__ = ["DATASETS", "DataWarning", "Dataset", "Inputs", "Split", "augment", "batches", "content_checksum",
           "default_cache_dir", "get_split", "image_extensions", "inputs_from_folder", "image_ids", "is_image_file", "load_cifar",
           "load_image_files", "load_image_folder", "resolve_data_dir", "train_val_split"]
