"""Datasets: the CIFAR-10/100 archives (restricted unpickling, checksums), image files, class-per-folder datasets at
any image size, splits identified by content (the validation split), batch augmentation on uint8 images, and what an
edge answers (``Inputs``).

May import: errors.
"""

from .augment import augment, augmenter, channel_stats, random_resized_crop
from .cifar import DATASETS, default_cache_dir, load_cifar, resolve_data_dir
from .datasets import FOLDER, load_dataset, load_recorded
from .folders import is_class_folder_tree, load_class_folders, load_image_folder
from .images import image_extensions, is_image_file, load_image_files
from .inputs import Inputs, inputs_from_folder
from .splits import Dataset, DataWarning, Split, batches, content_checksum, get_split, image_ids, train_val_split

__all__ = ["DATASETS", "FOLDER", "DataWarning", "Dataset", "Inputs", "Split", "augment", "augmenter", "batches",
           "channel_stats", "content_checksum", "default_cache_dir", "get_split", "image_extensions", "image_ids",
           "inputs_from_folder", "is_class_folder_tree", "is_image_file", "load_cifar", "load_class_folders",
           "load_dataset", "load_image_files", "load_image_folder", "load_recorded", "random_resized_crop",
           "resolve_data_dir", "train_val_split"]
