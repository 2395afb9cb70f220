"""Datasets on disk: the Parquet format, importers and seeded synthetic generators."""

from raysegbg.data.format import (
    DatasetMeta,
    Sample,
    class_frequencies,
    decode_png,
    encode_png,
    read_meta,
    read_split,
    write_dataset,
)

__all__ = [
    "DatasetMeta",
    "Sample",
    "class_frequencies",
    "decode_png",
    "encode_png",
    "read_meta",
    "read_split",
    "write_dataset",
]
