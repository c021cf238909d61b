"""Offline export of a training checkpoint to diffusers (``recipes/export.py``; docs/export.md).

``reader`` (what is read from the checkpoint), ``diffusers`` (model, scheduler, pipeline directory), ``card``
(the model card), ``exporter`` (:func:`export_checkpoint`, atomic output), ``cli`` (arguments, exit codes).
The live gather of a sharded module during a run is ``fv_accel/checkpoint/gather.py``.
"""

from fv_accel.export.card import build_model_card, hub_id_of, method_settings
from fv_accel.export.cli import main, parse_args, retry_command
from fv_accel.export.diffusers import (
    DTYPES,
    build_transformer,
    export_dtype_of,
    family_of,
    pipeline_source,
    scheduler_of,
    transformer_class,
    write_pipeline,
)
from fv_accel.export.exporter import ExportResult, export_checkpoint, is_previous_export
from fv_accel.export.reader import EXPORT_ROLES, read_export_state_dict, read_run

__all__ = ["DTYPES", "EXPORT_ROLES", "ExportResult", "build_model_card", "build_transformer", "export_checkpoint",
           "export_dtype_of", "family_of", "hub_id_of", "is_previous_export", "main", "method_settings",
           "parse_args", "pipeline_source", "read_export_state_dict", "read_run", "retry_command", "scheduler_of",
           "transformer_class", "write_pipeline"]
