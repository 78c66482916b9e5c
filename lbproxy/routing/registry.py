"""The one explicit list of routing plugins, and how a plugin is built from YAML.

Each plugin module declares `TYPE` (its name in YAML), `KIND` ("filter", "scorer" or
"picker"), a pydantic `Params` model (unknown keys are an error) and `build(params,
bctx)`. `register()` refuses a duplicate name rather than overwrite it.

Adding a scorer (or filter, or picker) = one module in `routing/plugins/` with those four
names + one line in `routing/plugins/__init__.py`'s BUILTIN_MODULES + its `type` in a
routing profile's YAML. Nothing else names plugins: optional hooks (`on_routed`, `forget`,
`cached_tokens`, `index_stats`) are found through the protocols of `interfaces`.

External plugins: a distribution declares entry points in the group `lbproxy.plugins`,
each naming a module (or any object) with the same four names, the entry point's name
being the YAML `type` (a `TYPE`, if given, must equal it):

    [project.entry-points."lbproxy.plugins"]
    my-scorer = "my_pkg.my_scorer"

The group is read only when a config names a plugin that is not built in, and only the
named entry point is imported. A name declared twice (by a built-in and an entry point,
or by two entry points) is an error naming both sources; so is an entry point that fails
to import, lacks one of the names, or whose `build` fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, get_args

from pydantic import BaseModel, ValidationError

from lbproxy.config_errors import validation_problems
from lbproxy.routing.interfaces import BuildContext, Filter, Picker, Scorer

Kind = Literal["filter", "scorer", "picker"]
ENTRY_POINT_GROUP = "lbproxy.plugins"
_PROTOCOL_OF: dict[str, type] = {"filter": Filter, "scorer": Scorer, "picker": Picker}


class PluginError(ValueError):
    """A plugin reference in a routing profile is wrong; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type: str
    kind: Kind
    params: type[BaseModel]
    module: Any  # a module, or any object with the plugin contract's names
    source: str = ""  # where it comes from, for messages
    external: bool = False

    def build(self, raw: dict[str, Any], bctx: BuildContext) -> Any:
        try:
            params = self.params.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(validation_problems(e, self.params, also_known=("type", "weight")))
            raise PluginError(f"{self.kind} '{self.type}': {problems}") from None
        if not self.external:
            return self.module.build(params, bctx)
        # Someone else's code: whatever goes wrong is a config error, not a traceback.
        try:
            plugin = self.module.build(params, bctx)
        except Exception as e:
            raise PluginError(
                f"{self.kind} '{self.type}' ({self.source}): build failed: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(plugin, _PROTOCOL_OF[self.kind]):
            raise PluginError(
                f"{self.kind} '{self.type}' ({self.source}): build returned a "
                f"{type(plugin).__name__}, which is not a {self.kind} (see routing.interfaces)"
            )
        return plugin


PLUGINS: dict[str, PluginSpec] = {}


def register(module: Any, *, source: str = "", external: bool = False) -> None:
    name = module.TYPE
    if name in PLUGINS:
        raise PluginError(f"routing plugin '{name}' is registered twice")
    src = source or getattr(module, "__name__", repr(module))
    PLUGINS[name] = PluginSpec(name, module.KIND, module.Params, module, src, external)


def lookup(type_name: str, kind: Kind) -> PluginSpec:
    spec = PLUGINS.get(type_name)
    if spec is None:
        spec = _load_external(type_name)
    if spec is None or spec.kind != kind:
        known = sorted(n for n, s in PLUGINS.items() if s.kind == kind)
        raise PluginError(f"unknown {kind} '{type_name}' (known: {', '.join(known)})")
    return spec


def _source(ep: EntryPoint) -> str:
    dist = ep.dist
    who = f"distribution '{dist.name} {dist.version}'" if dist is not None else "an entry point"
    return f"{who}, entry point {ENTRY_POINT_GROUP}: {ep.name} = {ep.value}"


def _load_external(type_name: str) -> PluginSpec | None:
    """Register the entry point named `type_name`, if any (importing only that one)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in PLUGINS:
            raise PluginError(
                f"routing plugin '{ep.name}' is declared twice: built in "
                f"({PLUGINS[ep.name].source}) and by {_source(ep)}"
            )
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise PluginError(
                f"routing plugin '{ep.name}' is declared twice: by {_source(other)} "
                f"and by {_source(ep)}"
            )
        found[ep.name] = ep
    ep = found.get(type_name)
    if ep is None:
        return None
    source = _source(ep)
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin is a config error, not a traceback
        raise PluginError(
            f"routing plugin '{type_name}' ({source}) cannot be imported: {type(e).__name__}: {e}"
        ) from None
    missing = [n for n in ("KIND", "Params", "build") if not hasattr(obj, n)]
    if missing:
        raise PluginError(
            f"routing plugin '{type_name}' ({source}) lacks {', '.join(missing)} "
            "(a plugin declares KIND, Params and build(params, bctx))"
        )
    kind, params = obj.KIND, obj.Params
    if kind not in get_args(Kind):
        raise PluginError(
            f"routing plugin '{type_name}' ({source}): KIND is {kind!r}, "
            "not one of filter, scorer, picker"
        )
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PluginError(
            f"routing plugin '{type_name}' ({source}): Params is not a pydantic model"
        )
    if getattr(obj, "TYPE", type_name) != type_name:
        raise PluginError(
            f"routing plugin '{type_name}' ({source}): its TYPE is {obj.TYPE!r}, "
            "not the entry point's name"
        )
    spec = PLUGINS[type_name] = PluginSpec(type_name, kind, params, obj, source, external=True)
    return spec


def _register_builtins() -> None:
    from lbproxy.routing.plugins import BUILTIN_MODULES

    for module in BUILTIN_MODULES:
        register(module)


_register_builtins()
