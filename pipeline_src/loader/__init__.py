"""The fast data loader: ffcv pipelines with seeded, switchable Bag-of-Tricks augmentation.

    loader = make_train_loader(beton, params, batch_size, seed, device)
    loader.set_epoch(start_epoch)          # resume; each iter() then yields one epoch
    for images, labels in loader: ...      # float32 (fp16 on CUDA under amp) NCHW, int64 (N,)
"""
from pipeline_src.ffcv_import import import_ffcv

import_ffcv()

from .pipelines import (FastLoader, LoaderError, make_train_loader, make_val_loader,  # noqa: E402
                        measure_throughput)

__all__ = ["FastLoader", "LoaderError", "make_train_loader", "make_val_loader", "measure_throughput"]
