"""Teacher outputs as WebDataset shards: format (shards), reader (stream), corpus packing (text), writer (precompute)."""

from megadistil.data.shards import (
    FORMAT_VERSION,
    Manifest,
    ProbCodec,
    ShardFormatError,
    ShardInfo,
    TeacherSample,
    decode_sample,
    encode_sample,
    tokenizer_fingerprint,
)
from megadistil.data.stream import DataConfig, ShardStream, collate
from megadistil.data.text import expand_files, iter_documents, pack_text

__all__ = [
    "FORMAT_VERSION", "DataConfig", "Manifest", "ProbCodec", "ShardFormatError", "ShardInfo", "ShardStream",
    "TeacherSample", "collate", "decode_sample", "encode_sample", "expand_files", "iter_documents", "pack_text",
    "tokenizer_fingerprint",
]
