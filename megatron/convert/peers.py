"""The peers' checkpoint formats (Megatron-DeepSpeed, Megatron-Core torch_dist, Megatron-LM's
legacy torch format): one adapter each, registered here beside the Hugging Face ones
(megatron/convert/__init__.py). An importer has FORMAT and read(src, tokenizer_overrides) ->
peer_common.Imported; an exporter also EXPRESSES (its allowlist Declaration) and write(...)."""

from __future__ import annotations

from megatron.convert import mcore, megatron_deepspeed, megatron_legacy
from megatron.convert.peer_common import Imported

IMPORTERS = {m.FORMAT: m for m in (megatron_deepspeed, mcore, megatron_legacy)}
EXPORTERS = {mcore.FORMAT: mcore}
IMPORT_FORMATS, EXPORT_FORMATS = tuple(IMPORTERS), tuple(EXPORTERS)

__all__ = ["IMPORTERS", "EXPORTERS", "IMPORT_FORMATS", "EXPORT_FORMATS", "Imported"]
