"""The one explicit list of routing plugins, and how a plugin is built from YAML.

Each plugin module declares `TYPE` (its name in YAML), `KIND` ("filter", "scorer" or
"picker"), a pydantic `Params` model (unknown keys are an error) and `build(params,
bctx)`. `register()` refuses a duplicate name rather than overwrite it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from lbproxy.config_errors import validation_problems
from lbproxy.routing.interfaces import BuildContext

Kind = Literal["filter", "scorer", "picker"]


class PluginError(ValueError):
    """A plugin reference in a routing profile is wrong; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type: str
    kind: Kind
    params: type[BaseModel]
    module: ModuleType

    def build(self, raw: dict[str, Any], bctx: BuildContext) -> Any:
        try:
            params = self.params.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(validation_problems(e, self.params, also_known=("type", "weight")))
            raise PluginError(f"{self.kind} '{self.type}': {problems}") from None
        return self.module.build(params, bctx)


PLUGINS: dict[str, PluginSpec] = {}


def register(module: ModuleType) -> None:
    name = module.TYPE
    if name in PLUGINS:
        raise PluginError(f"routing plugin '{name}' is registered twice")
    PLUGINS[name] = PluginSpec(name, module.KIND, module.Params, module)


def lookup(type_name: str, kind: Kind) -> PluginSpec:
    spec = PLUGINS.get(type_name)
    if spec is None or spec.kind != kind:
        known = sorted(n for n, s in PLUGINS.items() if s.kind == kind)
        raise PluginError(f"unknown {kind} '{type_name}' (known: {', '.join(known)})")
    return spec


def _register_builtins() -> None:
    from lbproxy.routing.plugins import BUILTIN_MODULES

    for module in BUILTIN_MODULES:
        register(module)


_register_builtins()
