"""Structured configs: Hydra schemas generated from constructors, the reducers' kwargs, override validation.

The defaults of every reducer, schedule and the model group live in one place, the Python signatures; the
YAML files under ``configs/`` hold only the values a user edits on purpose (plus comments). For every reducer
in ``tokred.plugins.REDUCERS`` (built-ins and plugins) ``register_configs`` stores in Hydra's ConfigStore a
dataclass made from its constructor signature (``inspect.signature`` + annotations mapped to OmegaConf
types), under ``schema/<kind>/<name>``, where ``kind`` is the class's ``kind`` (``merger`` or ``pruner``;
``none`` in both). ``configs/config.yaml`` merges the schema of the chosen option before its YAML::

    defaults:
      - schema/merger@merger: ${merger}   # the dataclass of the chosen merger: types and defaults
      - merger: none                      # configs/merger/none.yaml: values set on purpose

so ``merger.r=8.7`` fails at composition (``merger.r``, expected int) and a typo'd key fails naming the key.
A reducer without any YAML (a plugin, or one registered at run time) also gets its node stored as
``<kind>/<name>``, so ``pruner=random_prune`` works with no file and no ``hydra.searchpath``. A plugin that
ships YAML declares the package holding its config groups in the entry-point group ``tokred.configs``; the
SearchPathPlugin in ``hydra_plugins/tokred_searchpath`` adds those folders and calls ``register_configs``
whenever Hydra starts, so ``hydra.compose`` works without calling it first.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

__all__ = ["CONFIGS_ENTRY_POINT_GROUP", "ConfigError", "ModelConfig", "config_root", "plugin_config_dirs",
           "reducer_kwargs", "reducer_schema", "register_configs", "schedule_schema", "validate"]

log = logging.getLogger(__name__)

# A plugin YAML found through ``hydra.searchpath`` is validated against the node generated for the same name
# (what we want); Hydra calls that "automatic schema matching" and warns. Plugins that declare their folder in
# ``tokred.configs`` get no generated node, hence no warning.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name",
                        category=UserWarning)

#: Entry-point group of packages whose folder holds Hydra config groups (``merger/<name>.yaml`` ...).
CONFIGS_ENTRY_POINT_GROUP = "tokred.configs"
SLOTS = ("merger", "pruner")


class ConfigError(ValueError):
    """A composed configuration that cannot mean what it says (unused schedule, a key nothing reads)."""


# ---------------------------------------------------------------------------------------------- types
_SCALARS = (int, float, bool, str)


def _oc_type(tp: Any) -> Any:
    """The OmegaConf field type for a Python annotation; ``Any`` where OmegaConf has no equivalent
    (unions of several types, Literal, classes)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return Any
    if tp in _SCALARS:
        return tp
    if tp is Path:
        return str
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _oc_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if inner is not Any and len(rest) < len(args) else inner
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _SCALARS else Any
    if origin in (list, tuple, Sequence, typing.Sequence, typing.List, typing.Tuple):
        items = [a for a in args if a is not Ellipsis]
        item = _oc_type(items[0]) if len(set(items)) == 1 else Any
        return List[item if item in _SCALARS else Any]
    if origin in (dict, Mapping, typing.Mapping, typing.Dict):
        value = _oc_type(args[1]) if len(args) == 2 else Any
        return Dict[str, value if value in _SCALARS else Any]
    return Any


def _oc_default(value: Any) -> tuple[bool, Any]:
    """``(representable, value)``: a constructor default as a config value (tuples become lists)."""
    if value is None or isinstance(value, _SCALARS):
        return True, value
    if isinstance(value, (list, tuple)):
        ok = [_oc_default(v) for v in value]
        return all(o for o, _ in ok), [v for _, v in ok]
    if isinstance(value, Mapping):
        ok = {str(k): _oc_default(v) for k, v in value.items()}
        return all(o for o, _ in ok.values()), {k: v for k, (_, v) in ok.items()}
    return False, None


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a name only imported under TYPE_CHECKING: fall back to Any per parameter
        return {}


def _field(name: str, annotation: Any, default: Any) -> tuple[str, Any, Any] | None:
    """One dataclass field spec, or None when the default cannot be written in a config (the key is left out:
    the constructor keeps its own default)."""
    tp = _oc_type(annotation)
    if default is inspect.Parameter.empty:
        return name, tp, field(default=MISSING)
    ok, value = _oc_default(default)
    if not ok:
        return None
    if value is None and tp is not Any and typing.get_origin(tp) is not typing.Union:
        tp = Optional[tp]
    if isinstance(value, (list, dict)):
        return name, tp, field(default_factory=lambda v=value: _copy(v))
    return name, tp, field(default=value)


def _copy(value: Any) -> Any:
    return OmegaConf.to_container(OmegaConf.create(value)) if isinstance(value, (list, dict)) else value


def _make(cls_name: str, fields: list[tuple[str, Any, Any]], doc: str) -> type:
    made = dataclasses.make_dataclass(cls_name, fields)
    made.__module__ = __name__
    made.__doc__ = doc
    return made


_SCHEMA_CACHE: dict[tuple[str, Any], type] = {}


def reducer_schema(name: str, cls: type) -> type:
    """The config dataclass of reducer ``cls`` registered as ``name``: a ``name`` field (default ``name``) and
    one field per constructor parameter, typed from its annotation, defaulting to the constructor's default
    (``???`` when it has none; parameters whose default is not a plain value are left out)."""
    key = (name, cls)
    if key not in _SCHEMA_CACHE:
        hints = _hints(cls.__init__)
        fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "name":
                continue
            spec = _field(p.name, hints.get(p.name, Any), p.default)
            if spec is not None:
                fields.append(spec)
        doc = f"Config of reducer {name!r} ({cls.__module__}.{cls.__qualname__})."
        cls_name = re.sub(r"\W", "_", f"{cls.__name__}Config_{name}")
        made = _make(cls_name, fields, doc)
        try:
            OmegaConf.structured(made)
        except Exception as err:  # noqa: BLE001 - a default that contradicts its annotation: keep it, untyped
            log.warning("reducer %s: its constructor defaults do not fit their annotations (%s); its config keys "
                        "are left untyped", name, err)
            made = _make(cls_name, [(n, Any, f) for n, _, f in fields], doc)
        _SCHEMA_CACHE[key] = made
    return _SCHEMA_CACHE[key]


def _schedule_classes() -> dict[str, type]:
    from tokred import schedules

    found: dict[str, type] = {}
    stack = list(schedules.Schedule.__subclasses__())
    while stack:
        c = stack.pop()
        stack.extend(c.__subclasses__())
        if c.kind in schedules.SCHEDULES and dataclasses.is_dataclass(c):
            found.setdefault(c.kind, c)
    return found


def schedule_schema(kind: str, cls: type) -> type:
    """The config dataclass of schedule form ``cls``: ``kind``, its dataclass fields except ``r`` (the
    reducer's budget), and ``applies_to`` (the slots it is given to, default both)."""
    hints = _hints(cls)
    fields: list[tuple[str, Any, Any]] = [("kind", str, field(default=kind))]
    for f in dataclasses.fields(cls):
        if f.name == "r" or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty)
        if hasattr(default, "config"):  # a nested schedule (warmup's inner): its spec
            default = {"kind": default.kind}
        spec = _field(f.name, hints.get(f.name, Any) if not hasattr(default, "keys") else Any, default)
        if spec is not None:
            fields.append(spec)
    fields.append(("applies_to", List[str], field(default_factory=lambda: list(SLOTS))))
    return _make(f"{cls.__name__}ScheduleConfig", fields, f"Config of schedule kind {kind!r}.")


@dataclass
class ModelConfig:
    """The ``model`` group: a timm backbone (timm names; ``backbone_kwargs`` is free-form by design).

    Attributes:
        name: tokred model name (``vit_tiny``, ``test_vit``, ``eva02_large`` ...), see
            ``tokred.models.backbone.build_backbone``.
        embed_dim / num_heads / depth: timm architecture facts (passed to timm.create_model).
        patch_size: px per patch side.
        drop_path_rate: stochastic depth rate.
        checkpoint: local timm or tokred checkpoint file (.safetensors / .pth / .npz), or null.
        pretrained: a timm pretrained tag (e.g. ``vit_small_patch16_384.augreg_in21k_ft_in1k``) or null.
        normalization: input mean/std: ``auto`` (follow the weights) | ``imagenet`` | ``vit`` (0.5 / 0.5) |
            ``{mean: [...], std: [...]}`` (``tokred.config.input_normalization``).
        backbone_kwargs: extra ``timm.create_model`` kwargs.
    """

    name: str = MISSING
    embed_dim: int = MISSING
    num_heads: int = MISSING
    depth: int = MISSING
    patch_size: int = 16
    drop_path_rate: float = 0.0
    checkpoint: Optional[str] = None
    pretrained: Optional[str] = None
    normalization: Any = "auto"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- registration
def config_root() -> Path:
    """tokred's own config folder: the repository's ``configs/`` or the packaged ``tokred/_configs``.

    Raises:
        FileNotFoundError: neither holds a ``config.yaml`` (a broken install).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "_configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"tokred's configs were not found next to {here}; reinstall tokred")


def plugin_config_dirs() -> list[Path]:
    """Folders of the packages declared in the ``tokred.configs`` entry-point group (each holds config groups
    such as ``pruner/random_prune.yaml``); a package that cannot be imported is skipped with a warning."""
    import importlib.util

    dirs: list[Path] = []
    for ep in metadata.entry_points(group=CONFIGS_ENTRY_POINT_GROUP):
        package = ep.value.partition(":")[0]
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError) as err:
            log.warning("tokred.configs entry point %s = %s cannot be found: %s", ep.name, ep.value, err)
            continue
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            log.warning("tokred.configs entry point %s = %s is not a package folder; skipped", ep.name, ep.value)
            continue
        dirs.extend(Path(p) for p in locations)
    return dirs


def _yaml_exists(group: str, name: str, roots: Sequence[Path]) -> bool:
    return any((root / group / f"{name}{ext}").is_file() for root in roots for ext in (".yaml", ".yml"))


_STORED: set[tuple[str, str]] = set()


def register_configs() -> None:
    """Stores the generated schemas in Hydra's ConfigStore; idempotent, call before any Hydra compose (the
    SearchPathPlugin calls it whenever Hydra starts).

    Stores ``schema/<kind>/<name>`` for every registered reducer, ``<kind>/<name>`` for reducers without a
    YAML in tokred's configs or a ``tokred.configs`` package, ``schema/schedule/<kind>`` for every schedule
    form and ``schema/model/default``. A plugin reducer that cannot be imported is skipped with a warning
    (selecting it then fails, listing the installed ones).
    """
    from hydra.core.config_store import ConfigStore

    from tokred.plugins import REDUCERS

    cs = ConfigStore.instance()
    roots = [config_root(), *plugin_config_dirs()]
    wanted: set[tuple[str, str]] = set()
    for name in REDUCERS.names():
        try:
            cls = REDUCERS.get(name)
        except (ImportError, TypeError, ValueError, KeyError) as err:
            log.warning("reducer %s has no config schema: %s", name, err)
            continue
        node = reducer_schema(name, cls)
        for group in (SLOTS if cls.kind not in SLOTS else (cls.kind,)):
            cs.store(group=f"schema/{group}", name=name, node=node)
            if not _yaml_exists(group, name, roots):
                cs.store(group=group, name=name, node=node)
                wanted.add((group, name))
    for kind, cls in _schedule_classes().items():
        cs.store(group="schema/schedule", name=kind, node=schedule_schema(kind, cls))
    cs.store(group="schema/model", name="default", node=ModelConfig)
    for group, name in _STORED - wanted:  # run-time registrations that were removed since
        cs.repo.get(group, {}).pop(f"{name}.yaml", None)
    _STORED.clear()
    _STORED.update(wanted)


# ---------------------------------------------------------------------------------------------- reducers
def _reducer_class(name: Any, slot: str) -> type:
    from tokred.plugins import REDUCERS

    if name is None:
        raise ConfigError(f"{slot} config has no 'name'; choose one of {', '.join(REDUCERS.names())}")
    if name not in REDUCERS.names():
        close = difflib.get_close_matches(str(name), REDUCERS.names(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"{slot} {name!r} is not registered{hint}; installed: {', '.join(REDUCERS.names())} "
                          "(a plugin reducer needs its distribution installed)")
    return REDUCERS.get(name)


def _accepts_schedule(cls: type) -> bool:
    probe = getattr(cls, "accepts_schedule", None)
    if callable(probe):
        return bool(probe())
    return "schedule" in inspect.signature(cls.__init__).parameters


def reducer_kwargs(cfg: DictConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """Constructor kwargs of both reducer slots of a composed config.

    The group ``schedule`` (minus ``applies_to``) is attached as ``schedule=`` to every slot in its
    ``applies_to`` whose reducer accepts a schedule (``accepts_schedule()``), unless the slot's own config
    sets ``schedule``; a constant schedule is not attached (the reducer's own ``r`` is constant already).

    Args:
        cfg: the composed tokred config (``merger``, ``pruner``, ``schedule`` sections).

    Returns:
        ``{"merger": (name, kwargs), "pruner": (name, kwargs)}``: exactly what each constructor gets, for
        building the model and for recording in metrics.json.

    Raises:
        ConfigError: a slot without ``name`` or with an unregistered one (installed names listed), a missing
            required value, or a non-constant schedule that no reducer of its ``applies_to`` slots accepts
            (names ``schedule=<kind>`` and the registered reducers that accept schedules).
    """
    sched = OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") is not None else {}
    assert isinstance(sched, dict)
    applies = list(sched.pop("applies_to", SLOTS) or ())
    unknown = sorted(set(applies) - set(SLOTS))
    if unknown:
        raise ConfigError(f"schedule.applies_to names {unknown}; valid slots: {', '.join(SLOTS)}")
    kind = sched.get("kind", "constant")
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    attached: list[str] = []
    for slot in SLOTS:
        section = cfg.get(slot)
        if section is None:
            raise ConfigError(f"the config has no {slot!r} section; select one, e.g. {slot}=none")
        try:
            kwargs = OmegaConf.to_container(section, resolve=True, throw_on_missing=True)
        except Exception as err:  # noqa: BLE001 - omegaconf's MissingMandatoryValue / interpolation errors
            raise ConfigError(f"{slot}: {err}; set the value with {slot}.<key>=...") from err
        assert isinstance(kwargs, dict)
        name = kwargs.pop("name", None)
        cls = _reducer_class(name, slot)
        if kind != "constant" and slot in applies and _accepts_schedule(cls) and kwargs.get("schedule") is None:
            kwargs["schedule"] = dict(sched)
            attached.append(slot)
        out[slot] = (str(name), kwargs)
    if kind != "constant" and not attached:
        from tokred.plugins import REDUCERS

        takers = []
        for n in REDUCERS.names():
            try:
                if _accepts_schedule(REDUCERS.get(n)):
                    takers.append(n)
            except (ImportError, TypeError, ValueError, KeyError):
                continue
        chosen = ", ".join(f"{s}={out[s][0]}" for s in SLOTS)
        raise ConfigError(f"schedule={kind} is not used: no reducer of its applies_to slots {applies} accepts a "
                          f"schedule (or each sets its own) with {chosen}; reducers that accept schedules: "
                          f"{', '.join(takers)}; drop schedule= or choose one of them")
    return out


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuses command-line overrides that nothing reads, and wrongly typed values of the root config.

    A ``+key=value`` / ``++key=value`` override must name a key that the schema (or, for groups without one,
    some option file of the group; for root sections, ``config.yaml``) defines. Allowed freely: ``hydra.*``,
    ``local.*``, ``model.backbone_kwargs.*``, ``decoder.kwargs.*`` and group selections (``+experiment=x``).
    Root values whose default in ``config.yaml`` is an int or a bool must stay one (``train.epochs=3.5``).

    Args:
        cfg: the composed config.
        overrides: the command-line overrides (``HydraConfig.get().overrides.task``).

    Raises:
        ConfigError: names the key and the close matches ("did you mean train.epochs?"), or the type.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    root = config_root()
    groups = {p.name for p in root.iterdir() if p.is_dir()} | {"schema", "hydra"}
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        key = ov.key_or_group
        if not (ov.is_add() or ov.is_force_add()) or "/" in key or (key in groups and "." not in key):
            continue
        if key.split(".")[0] in ("hydra", "local") or key.startswith(("model.backbone_kwargs.", "decoder.kwargs.")):
            continue
        known = _known_keys(cfg, key.split(".")[0], root)
        if known is None or key in known:
            continue
        parts = key.split(".")
        if any(known.get(".".join(parts[:i]), 0) in (None, {}) for i in range(1, len(parts))):
            continue  # below a free-form value (an Any-typed null such as merger.schedule, or an empty mapping)
        parent = ".".join(parts[:-1])
        siblings = sorted(k for k in known if k.rpartition(".")[0] == parent) or \
            sorted(k for k in known if k.count(".") == key.count("."))
        leaves = {k.rpartition(".")[2]: k for k in siblings}
        close = [leaves[c] for c in difflib.get_close_matches(parts[-1], list(leaves), n=3, cutoff=0.6)]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"+{key}={ov.value()}: nothing reads {key!r}{hint} (drop the '+' to change an existing "
                          f"key; keys at this level: {', '.join(siblings)})")
    _check_root_types(cfg, root)


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    """``{dotted key: value}`` of every node (inner ones too), interpolations unresolved."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    keys = {prefix: node} if prefix else {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                keys.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return keys


def _known_keys(cfg: DictConfig, section: str, root: Path) -> dict[str, Any] | None:
    """Every dotted key that something reads under ``section``; None when the section is free-form."""
    from tokred.plugins import REDUCERS

    if section in SLOTS:
        name = OmegaConf.select(cfg, f"{section}.name")
        if name not in REDUCERS.names():
            return None  # reducer_kwargs reports the unknown name
        return _flat(OmegaConf.structured(reducer_schema(name, REDUCERS.get(name))), section)
    if section == "schedule":
        classes = _schedule_classes()
        kind = OmegaConf.select(cfg, "schedule.kind")
        return _flat(OmegaConf.structured(schedule_schema(kind, classes[kind])), section) if kind in classes else None
    if section == "model":
        return _flat(OmegaConf.structured(ModelConfig), section)
    if (root / section).is_dir():  # a group without a schema: the union of its option files
        keys: dict[str, Any] = {}
        for path in (root / section).glob("*.yaml"):
            keys.update(_flat(OmegaConf.load(path), section))
        return keys
    return _flat(OmegaConf.load(root / "config.yaml"), "")


def _check_root_types(cfg: DictConfig, root: Path) -> None:
    defaults = OmegaConf.load(root / "config.yaml")

    def walk(default: Any, value: Any, key: str) -> None:
        if isinstance(default, DictConfig):
            if isinstance(value, DictConfig):
                for k in default:
                    if k not in ("defaults", "hydra") and not OmegaConf.is_interpolation(default, k) and k in value:
                        walk(default[k], value[k], f"{key}.{k}" if key else str(k))
            return
        if isinstance(default, ListConfig) or value is None or default is None:
            return
        if isinstance(default, bool) and not isinstance(value, bool):
            expected = "a bool (true/false)"
        elif isinstance(default, int) and not isinstance(default, bool) and (isinstance(value, bool)
                                                                             or not isinstance(value, int)):
            expected = "an integer"
        else:
            return
        raise ConfigError(f"{key}={value!r} ({type(value).__name__}) must be {expected} (default {default!r})")

    walk(defaults, cfg, "")
