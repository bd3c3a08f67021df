"""Training data: photo folders -> captioned records -> transformed, bucketed batches."""

from .buckets import BucketBatchSampler, assign_bucket, default_bucket_step, make_buckets
from .class_images import class_image_name, ensure_class_images, save_png_atomic
from .dataset import DreamBoothDataset, collate
from .images import (
    IMAGE_EXTENSIONS,
    ImageError,
    image_size,
    list_image_files,
    load_rgb,
    open_oriented,
    to_rgb,
)
from .scan import (
    CAPTION_EXTENSIONS,
    DatasetError,
    ImageRecord,
    parse_repeats_folder,
    read_caption_sidecar,
    scan_instance_folder,
)
from .transforms import CropResult, crop_and_flip, resize_to_cover, to_tensor

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "CropResult",
    "DatasetError",
    "DreamBoothDataset",
    "ImageError",
    "ImageRecord",
    "assign_bucket",
    "class_image_name",
    "collate",
    "crop_and_flip",
    "default_bucket_step",
    "ensure_class_images",
    "image_size",
    "list_image_files",
    "load_rgb",
    "make_buckets",
    "open_oriented",
    "parse_repeats_folder",
    "read_caption_sidecar",
    "resize_to_cover",
    "save_png_atomic",
    "scan_instance_folder",
    "to_rgb",
    "to_tensor",
]
