"""Errors in configuration values that name config fields, not flags.

Library code (configs, layouts, converters) knows config fields, not how a user spelled them: a
message writes each field it names in braces, e.g. "{topk} 3 must be between 1 and {num_experts}
2". `str()` shows the bare field names ("topk 3 must be ..."); a front end shows its own names
with `render` (the command line: its flags, "--moe-router-topk 3 must be ..."), so a Hugging Face
import never tells a user about a flag they never typed.
"""

from __future__ import annotations

import re
from typing import Mapping

_FIELD = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class FieldError(ValueError):
    def __init__(self, template: str, owner: str | None = None):
        """`owner`: the config class whose fields the message names (where another config has a
        field of the same name, e.g. RecomputeConfig.num_layers)."""
        super().__init__(template)
        self.template, self.owner = template, owner

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each {field} shown as names[field] (the bare field name if absent)."""
        return _FIELD.sub(lambda m: names.get(m.group(1), m.group(1)), self.template)

    def __str__(self) -> str:
        return self.render({})
