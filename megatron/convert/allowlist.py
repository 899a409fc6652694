"""What a format can express: each adapter declares, for EVERY field of ModelConfig and
MoEConfig, either ANY (the format expresses the field, or the field does not change the function
an exported model computes) or a Rule (the values it can express, and the message naming what
blocks the others). A field a declaration does not mention is refused by name, so a feature
added to the configs later is never exported silently wrong: export refuses it until each
adapter has decided what it means there.

    Declaration("mixtral",
                model={"normalization": only("RMSNorm", message="LayerNorm: ..."),
                       **any_value("num_layers", "hidden_size", ...)},
                moe={...}, dense_refused="a dense model ...")

A Rule reads the field's value and both configs (`ok(value, model, moe)`), so a check that spans
fields (MoE in every layer: `layers` against num_layers) sits under the field it gates; the
fields it also reads are declared on their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

Check = Callable[[Any, ModelConfig, Optional[MoEConfig]], bool]
Message = Union[str, Callable[[Any, ModelConfig, Optional[MoEConfig]], str]]


class _AnyValue:
    def __repr__(self) -> str:
        return "ANY"


ANY = _AnyValue()  # every value of the field is expressed (or does not change the function)


@dataclass(frozen=True)
class Rule:
    """Some values of one field: `ok(value, model, moe)` whether the format expresses this one;
    `message` (a string, or a function of the same arguments) names what blocks it and the flag
    to change."""

    ok: Check
    message: Message

    def blocker(self, value, model: ModelConfig, moe: Optional[MoEConfig]) -> Optional[str]:
        if self.ok(value, model, moe):
            return None
        return self.message if isinstance(self.message, str) else self.message(value, model, moe)


def only(*allowed, message: Message) -> Rule:
    """The field must hold one of `allowed`."""
    return Rule(lambda value, model, moe: value in allowed, message)


def when(ok: Check, message: Message) -> Rule:
    """A predicate over the field's value and both configs."""
    return Rule(ok, message)


def any_value(*names: str) -> dict[str, _AnyValue]:
    return {name: ANY for name in names}


Entry = Union[_AnyValue, Rule]


@dataclass(frozen=True)
class Declaration:
    """What format `fmt` can express. `model` covers every ModelConfig field, `moe` every
    MoEConfig field, or is None for a dense format (every MoE model is refused with
    `moe_refused`); an MoE-only format refuses a dense model with `dense_refused`. Blockers come
    in the declaration's order."""

    fmt: str
    model: Mapping[str, Entry]
    moe: Optional[Mapping[str, Entry]] = None
    moe_refused: str = ""
    dense_refused: str = ""

    def __post_init__(self):
        for side, entries in (("ModelConfig", self.model), ("MoEConfig", self.moe or {})):
            bad = [name for name, e in entries.items() if not isinstance(e, (_AnyValue, Rule))]
            if bad:
                raise TypeError(f"{self.fmt}: {side} {bad} must be declared ANY or a Rule")
        if self.moe is None and not self.moe_refused:
            raise TypeError(f"{self.fmt}: a dense format says why it refuses MoE (moe_refused)")
        if self.moe is not None and not self.dense_refused:
            raise TypeError(f"{self.fmt}: an MoE format says why it refuses dense (dense_refused)")

    def undeclared(self, model_cls: type = ModelConfig, moe_cls: type = MoEConfig) -> list[str]:
        """The config fields this declaration does not mention ("MoEConfig.x"); a dense format
        covers every MoEConfig field by refusing MoE."""
        out = [f"ModelConfig.{f.name}" for f in dataclasses.fields(model_cls)
               if f.name not in self.model]
        if self.moe is not None:
            out += [f"MoEConfig.{f.name}" for f in dataclasses.fields(moe_cls)
                    if f.name not in self.moe]
        return out

    def stale(self, model_cls: type = ModelConfig, moe_cls: type = MoEConfig) -> list[str]:
        """Declared names that are no field (a field renamed or removed)."""
        model_fields = {f.name for f in dataclasses.fields(model_cls)}
        moe_fields = {f.name for f in dataclasses.fields(moe_cls)}
        return ([f"ModelConfig.{n}" for n in self.model if n not in model_fields]
                + [f"MoEConfig.{n}" for n in self.moe or {} if n not in moe_fields])

    def blockers(self, model: ModelConfig, moe: Optional[MoEConfig]) -> list[str]:
        """What of (model, moe) this format cannot express; empty when the model fits."""
        out = []
        if moe is not None and self.moe is None:
            out.append(self.moe_refused)
        out += _blockers(self.model, model, model, moe)
        if moe is None and self.moe is not None:
            out.append(self.dense_refused)
        elif moe is not None and self.moe is not None:
            out += _blockers(self.moe, moe, model, moe)
        out += self._unknown("ModelConfig", model, self.model)
        if moe is not None and self.moe is not None:
            out += self._unknown("MoEConfig", moe, self.moe)
        return out

    def _unknown(self, side: str, cfg, entries: Mapping[str, Entry]) -> list[str]:
        return [f"{side}.{f.name} = {getattr(cfg, f.name)!r} is not something the {self.fmt} "
                f"adapter knows how to express (megatron.convert.{self.fmt}.EXPRESSES does not "
                "declare it)"
                for f in dataclasses.fields(cfg) if f.name not in entries]


def _blockers(entries: Mapping[str, Entry], cfg, model: ModelConfig,
              moe: Optional[MoEConfig]) -> list[str]:
    out = []
    for name, entry in entries.items():
        if isinstance(entry, Rule) and hasattr(cfg, name):  # an absent field holds no feature
            found = entry.blocker(getattr(cfg, name), model, moe)
            if found:
                out.append(found)
    return out
