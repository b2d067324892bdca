"""Structured configs (tokred/structured.py): schemas generated from constructors refuse wrong types and typos
at composition, plugin reducers compose by name without YAML, YAML files hold only what they set on purpose,
``reducer_kwargs`` attaches schedules honestly and ``validate`` refuses appended keys that nothing reads.

Composition only (no model is built), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokred.plugins import REDUCERS
from tokred.reducers.base import Pruner
from tokred.structured import ConfigError, config_root, reducer_kwargs, register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BASELINES = ROOT / "baselines" / "tokred_baselines" / "configs"
REDUCER_YAMLS = sorted([*CONFIGS.glob("merger/*.yaml"), *CONFIGS.glob("pruner/*.yaml"),
                        *BASELINES.glob("merger/*.yaml"), *BASELINES.glob("pruner/*.yaml")])


@pytest.fixture(scope="module")
def cfg_of():
    """``cfg_of(overrides) -> DictConfig`` composed from the repository's configs."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_root()), version_base="1.3"):
        yield lambda overrides: compose(config_name="config", overrides=list(overrides))


def _message(err: BaseException) -> str:
    """Hydra's message and the OmegaConf cause it wraps (the CLI prints both)."""
    return f"{err} {err.__cause__}"


def _defaults(cls: type) -> dict:
    """Constructor defaults as config values (tuples become lists)."""
    out = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.default is not inspect.Parameter.empty:
            out[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


# ---------------------------------------------------------------------------------------------- schemas
def test_wrong_type_is_refused_at_composition_naming_key_and_type(cfg_of):
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        cfg_of(["merger=tome", "merger.r=8.7"])
    assert "merger.r" in _message(err.value) and "Integer" in _message(err.value)
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        cfg_of(["model.embed_dim=wide"])
    assert "model.embed_dim" in _message(err.value)


@pytest.mark.parametrize("override,key", [("merger.rr=2", "rr"), ("pruner.threshhold=0.9", "threshhold"),
                                          ("train.epoch=3", "epoch"), ("schedule.inflexion=1", "inflexion")])
def test_typo_is_refused_naming_the_key(cfg_of, override, key):
    group = {"merger": "merger=tome", "pruner": "pruner=early_exit", "schedule": "schedule=linear"}
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        cfg_of([group.get(override.split(".")[0], "seed=0"), override])
    assert key in _message(err.value)


def test_model_schema_takes_pretrained_tags_and_free_backbone_kwargs(cfg_of):
    cfg = cfg_of(["model=test_vit", "model.pretrained=vit_small_patch16_384.augreg_in21k_ft_in1k",
                  "+model.backbone_kwargs.qk_norm=true"])
    assert cfg.model.pretrained == "vit_small_patch16_384.augreg_in21k_ft_in1k"
    assert cfg.model.backbone_kwargs == {"qk_norm": True} and cfg.model.depth == 6
    assert cfg_of([]).model.pretrained is None


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")  # via searchpath
@pytest.mark.parametrize("path", REDUCER_YAMLS, ids=lambda p: f"{p.parent.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_reducer_yaml_composes_to_constructor_defaults_plus_what_it_sets(cfg_of, path):
    """Replaces test_plugin's test_config_files_name_every_constructor_argument: the composed section names
    every constructor argument (the schema does), the file only what it sets on purpose."""
    group, name = path.parent.name, path.stem
    raw = yaml.safe_load(path.read_text())
    assert raw.pop("name") == name
    cls = REDUCERS.get(name)
    assert cls.kind in (group, "none")
    params = _defaults(cls)
    assert set(raw) <= set(params), f"{path.name} sets keys the constructor does not take"
    extra = [f"hydra.searchpath=[file://{BASELINES}]"] if BASELINES in path.parents else []
    section = OmegaConf.to_container(cfg_of([f"{group}={name}", *extra])[group])
    assert section.pop("name") == name
    assert set(section) == set(params)
    assert {k: v for k, v in section.items() if k not in raw} == {k: v for k, v in params.items() if k not in raw}
    assert {k: section[k] for k in raw} == raw
    cls(**section)  # the composed values build the reducer


def test_runtime_plugin_reducer_composes_by_name_without_yaml(cfg_of):
    class Halver(Pruner):
        def __init__(self, keep_ratio: float = 0.5, blocks: list[int] | None = None, seed: int = 3) -> None:
            super().__init__()

    REDUCERS.register("halver_test", Halver, distribution="tests")
    try:
        register_configs()
        cfg = cfg_of(["pruner=halver_test", "pruner.seed=4"])
        assert OmegaConf.to_container(cfg.pruner) == {"name": "halver_test", "keep_ratio": 0.5, "blocks": None,
                                                      "seed": 4}
        assert reducer_kwargs(cfg)["pruner"] == ("halver_test", {"keep_ratio": 0.5, "blocks": None, "seed": 4})
        with pytest.raises((HydraException, OmegaConfBaseException)) as err:
            cfg_of(["pruner=halver_test", "pruner.seed=many"])
        assert "pruner.seed" in _message(err.value)
    finally:
        REDUCERS.unregister("halver_test")
        register_configs()
    with pytest.raises(HydraException, match="(?s)halver_test.*early_exit"):  # gone, and the options are listed
        cfg_of(["pruner=halver_test"])


def test_unknown_reducer_lists_the_installed_ones(cfg_of):
    with pytest.raises(HydraException, match="(?s)Could not find 'pruner/foo'.*cropr.*early_exit"):
        cfg_of(["pruner=foo"])
    cfg = cfg_of(["pruner.name=croppr"])  # a renamed slot: caught by reducer_kwargs with a suggestion
    with pytest.raises(ConfigError, match=r"pruner 'croppr' is not registered \(did you mean cropr\?\); installed"):
        reducer_kwargs(cfg)


# ---------------------------------------------------------------------------------------------- reducer_kwargs
def test_schedule_is_attached_only_where_accepted(cfg_of):
    got = reducer_kwargs(cfg_of(["merger=tome", "merger.r=4", "pruner=early_exit", "schedule=linear"]))
    assert got["merger"] == ("tome", {"r": 4, "schedule": {"kind": "linear", "inflection": -1.0},
                                      "proportional_attention": True, "partition": "patches"})
    assert "schedule" not in got["pruner"][1] and got["pruner"][0] == "early_exit"
    constant = reducer_kwargs(cfg_of(["merger=tome"]))
    assert constant["merger"][1]["schedule"] is None and constant["pruner"] == ("none", {})
    own = reducer_kwargs(cfg_of(["pruner=cropr", "+pruner.schedule.kind=warmup"]))
    assert own["pruner"][1]["schedule"] == {"kind": "warmup"}  # the reducer's own schedule is kept
    with pytest.raises(ConfigError, match="sets its own"):  # ... and a group schedule it would hide is refused
        reducer_kwargs(cfg_of(["pruner=cropr", "+pruner.schedule.kind=warmup", "schedule=linear"]))


def test_schedule_no_reducer_accepts_is_refused(cfg_of):
    with pytest.raises(ConfigError, match=r"schedule=linear.*early_exit.*accept schedules: .*cropr.*tome"):
        reducer_kwargs(cfg_of(["schedule=linear", "pruner=early_exit"]))
    with pytest.raises(ConfigError, match="schedule=warmup"):  # tome accepts, but applies_to excludes the merger
        reducer_kwargs(cfg_of(["merger=tome", "schedule=warmup", "schedule.applies_to=[pruner]"]))


# ---------------------------------------------------------------------------------------------- validate
def test_appended_key_nothing_reads_is_refused_with_close_matches(cfg_of):
    ov = ["+train.epoch=3"]
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean train\.epochs\?"):
        validate(cfg_of(ov), ov)
    ov = ["pruner=cropr", "+pruner.rr=3"]
    with pytest.raises(ConfigError, match=r"did you mean pruner\.r\?"):
        validate(cfg_of(ov), ov)
    with pytest.raises(ConfigError, match="train.epochs=3.5"):  # root values keep their type
        validate(cfg_of(["train.epochs=3.5"]), ["train.epochs=3.5"])


def test_validate_allows_free_form_and_legacy_appends(cfg_of):
    for ov in (["+model.backbone_kwargs.init_values=1e-5", "+hydra.job.env_set.X=1"],
               ["pruner.name=random_prune", "+pruner.r=16"],  # old grid style: r is a random_prune argument
               ["merger=tome", "+merger.schedule.kind=linear"], ["experiment=smoke", "train.epochs=2"]):
        validate(cfg_of(ov), ov)


# ---------------------------------------------------------------------------------------------- files
def _today_form(overrides: list[str]) -> list[str]:
    """Committed grids keep the form their protocol.json recorded (``pruner.name=X +pruner.r=16``); the
    runner reads it as ``pruner=X pruner.r=16`` (tokred.ablations.grid), and so does this test."""
    out = []
    for o in overrides:
        key, value = o.lstrip("+").split("=", 1)
        out.append(f"{key.split('.')[0]}={value}" if key in ("merger.name", "pruner.name") else f"{key}={value}")
    return out


def test_experiments_and_grid_cells_compose(cfg_of):
    for exp in sorted(p.stem for p in CONFIGS.glob("experiment/*.yaml")):
        validate(cfg_of([f"experiment={exp}"]), [f"experiment={exp}"])  # types of the root values kept
    assert cfg_of(["experiment=step"]).pruner.name == "early_exit"
    # every cell's overrides, folded per reducer selection ({slot: {choice: {key: value}}}) so that a few
    # compositions cover every key of every cell: each merger choice is composed together with a pruner choice
    per_slot: dict[str, dict[str, dict[str, str]]] = {"merger": {"none": {}}, "pruner": {"none": {}}}
    base = []
    for path in sorted(CONFIGS.glob("grid/*.yaml")):
        grid = yaml.safe_load(path.read_text())
        base = base or grid["overrides"]
        for cell, spec in grid["cells"].items():
            overrides = _today_form(spec["overrides"])
            choice = {o.split("=")[0]: o.split("=")[1] for o in overrides if "." not in o.split("=")[0]}
            for o in overrides:
                key, value = o.split("=", 1)
                slot = key.split(".")[0]
                per_slot[slot].setdefault(choice.get(slot, "none"), {})
                if "." in key:
                    per_slot[slot][choice.get(slot, "none")][key] = value
    installed = set(REDUCERS.names())  # optional plugin cells are skipped by the runner when not installed
    mergers = [(c, k) for c, k in per_slot["merger"].items() if c in installed]
    pruners = [(c, k) for c, k in per_slot["pruner"].items() if c in installed]
    for i in range(max(len(mergers), len(pruners))):
        (m, m_keys), (p, p_keys) = mergers[i % len(mergers)], pruners[i % len(pruners)]
        ov = [*base, f"merger={m}", f"pruner={p}", *(f"{k}={v}" for k, v in {**m_keys, **p_keys}.items())]
        cfg = cfg_of(ov)
        validate(cfg, ov)
        assert set(reducer_kwargs(cfg)["merger"][1]) >= {k.split(".")[1] for k in m_keys}
    assert {"cropr", "early_exit"} <= {c for c, _ in pruners} and len(mergers) >= 4


def test_plugin_config_folder_comes_from_the_tokred_configs_entry_point(tmp_path, monkeypatch):
    """A plugin's YAML folder is on Hydra's search path with no hydra.searchpath, and a reducer with such a
    YAML gets no generated ``<kind>/<name>`` node (the file is the option; its schema still applies)."""
    from importlib import metadata

    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore

    from tokred import structured

    (tmp_path / "my_plugin_cfg" / "pruner").mkdir(parents=True)
    (tmp_path / "my_plugin_cfg" / "__init__.py").write_text("")
    (tmp_path / "my_plugin_cfg" / "pruner" / "random_prune.yaml").write_text("name: random_prune\nr: 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint("my_plugin", "my_plugin_cfg", structured.CONFIGS_ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr(structured.metadata, "entry_points",
                        lambda group=None, **kw: [ep] if group == structured.CONFIGS_ENTRY_POINT_GROUP
                        else real(group=group, **kw))
    assert structured.plugin_config_dirs() == [tmp_path / "my_plugin_cfg"]
    try:
        paths = [e.path for e in create_config_search_path(str(config_root())).get_path()]
        assert f"file://{(tmp_path / 'my_plugin_cfg').resolve()}" in paths  # added by the SearchPathPlugin
        if "random_prune" in REDUCERS.names():
            assert "random_prune.yaml" not in ConfigStore.instance().repo.get("pruner", {})
            assert "random_prune.yaml" in ConfigStore.instance().repo["schema"]["pruner"]
    finally:
        monkeypatch.undo()
        register_configs()
