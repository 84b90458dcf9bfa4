"""Export a megadistil run as a packed 1.58-bit checkpoint that vanilla transformers loads."""

from megadistil.export.sources import BaseModel, CheckpointRef, ExportError, StudentParts, locate_checkpoint
from megadistil.export.ternary import (
    ExportConfig,
    ExportResult,
    StudentSpec,
    convert_checkpoint,
    export_student,
    format_size_report,
    student_spec,
)
from megadistil.export.verify import VerifyConfig, format_figures, verify_export

__all__ = [
    "BaseModel", "CheckpointRef", "ExportConfig", "ExportError", "ExportResult", "StudentParts", "StudentSpec",
    "VerifyConfig", "convert_checkpoint", "export_student", "format_figures", "format_size_report",
    "locate_checkpoint", "student_spec", "verify_export",
]
