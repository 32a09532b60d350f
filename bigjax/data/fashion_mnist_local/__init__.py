"""TFDS builder `fashion_mnist_local`: Fashion-MNIST from local idx files.

Importing this package registers the builder with TFDS.
"""

from bigjax.data.fashion_mnist_local.fashion_mnist_local_dataset_builder import (
    Builder, CLASS_NAMES, read_idx, read_split)
