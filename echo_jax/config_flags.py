"""absl flags generated from the config dataclasses: one flag per field, its help the field's
comment in `echo_jax/config.py`, so an entry point can never drift from the config.

`define_flags` makes one dataclass's flags (experiments.rl: RLConfig, experiments.evaluate:
AgentConfig); `define_run_flags` makes a flag for every field of every section of a run's
Config (experiments.train, experiments.sweep), named as RUN_SECTIONS says where a bare field
name would clash or an older flag name is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from echo_jax import config as C
from echo_jax.objective.objectives import OBJECTIVES, objective_spec
from echo_jax.util import compilation_cache

_FIELD = re.compile(r"^\s+(\w+): [^=]+= .*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")

FlagNames = Mapping[str, str]  # {field: flag}, as define_flags returns it.


def define_jax_cache_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """--jax_cache, for the entry points that run a model in a fresh process (see
    `echo_jax.util.compilation_cache`)."""
    return flags.DEFINE_string(
        "jax_cache",
        compilation_cache.DEFAULT_DIR,
        "Persistent XLA compilation cache: later runs load what earlier ones compiled "
        "('' turns it off).",
        flag_values=flag_values,
    )


def apply_jax_cache(holder: flags.FlagHolder) -> None:
    """Turns the cache on when the flag names a folder; call before anything compiles."""
    if holder.value:
        compilation_cache.enable_compilation_cache(holder.value)


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines just above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        comment, field = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            above.append(comment.group(1).strip())
        elif field:
            out[field.group(1)] = (field.group(2) or " ".join(above)).strip() or field.group(1)
            above = []
        else:
            above = []
    return out


def _kind(hint: Any) -> Any:
    """The type a field's flag parses: `X | None` is X, `tuple[str, ...]` is tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    return typing.get_origin(hint) or hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _check_fields(cls: type, what: str, names: Sequence[str]) -> None:
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{what} names {', '.join(unknown)}, not fields of {cls.__name__}")


def define_flags(
    cls: type,
    choices: Mapping[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
    flag_values: flags.FlagValues = flags.FLAGS,
    *,
    prefix: str = "",
    rename: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    optional: bool = False,
    note: str = "",
) -> dict[str, str]:
    """Defines a flag per field of `cls`, its help the field's comment (plus `note`).

    A flag is named `prefix` + the field's name unless `rename` names it; its default is the
    dataclass's unless `defaults` gives one, or None for every flag when `optional` (read back
    by `replace_from_flags`, an unset flag keeps the base config's value). A field in `choices`
    takes only those values: an enum, or for a tuple field a comma-separated list checked item
    by item. Returns {field: flag name}."""
    choices, rename, defaults = dict(choices or {}), dict(rename or {}), dict(defaults or {})
    for what, keys in (("choices", choices), ("rename", rename), ("defaults", defaults)):
        _check_fields(cls, what, list(keys))
    _check_fields(cls, "skip", list(skip))
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = rename.get(f.name, prefix + f.name)
        default = None if optional else defaults.get(f.name, _default(f))
        kind, allowed = _kind(hints[f.name]), choices.get(f.name)
        doc = " ".join(x for x in (helps.get(f.name, f.name), note) if x)
        kw = {"flag_values": flag_values}
        if kind is tuple:
            default = None if default is None else list(default)
            if allowed is not None:
                doc += f" Any of: {', '.join(allowed)}."
            flags.DEFINE_list(name, default, doc, **kw)
            if allowed is not None:
                flags.register_validator(
                    name,
                    lambda v, ok=frozenset(allowed): v is None or set(v) <= ok,
                    f"--{name}: every item must be one of {', '.join(allowed)}",
                    flag_values=flag_values,
                )
        elif allowed is not None:
            flags.DEFINE_enum(name, default, list(allowed), doc, **kw)
        elif kind is bool:
            flags.DEFINE_bool(name, default, doc, **kw)
        elif kind is int:
            flags.DEFINE_integer(name, default, doc, **kw)
        elif kind is float:
            flags.DEFINE_float(name, default, doc, **kw)
        elif kind is str:
            flags.DEFINE_string(name, default, doc, **kw)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {hints[f.name]}")
        names[f.name] = name
    return names


def _values(cls: type, names: FlagNames, flag_values: flags.FlagValues) -> dict[str, Any]:
    """{field: its flag's value}, list flags as tuples where the field is a tuple."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field, flag in names.items():
        value = flag_values[flag].value
        out[field] = tuple(value) if value is not None and _kind(hints[field]) is tuple else value
    return out


def from_flags(cls: type, names: FlagNames, flag_values=flags.FLAGS, **fixed: Any):
    """An instance of `cls` from the flags `names` (tuples for list flags), plus `fixed`."""
    return cls(**_values(cls, names, flag_values), **fixed)


def replace_from_flags(base: Any, names: FlagNames, flag_values=flags.FLAGS) -> Any:
    """`base` with each field whose flag holds a value (not None) set to that value."""
    values = _values(type(base), names, flag_values)
    return dataclasses.replace(base, **{k: v for k, v in values.items() if v is not None})


# ----------------------------------------------------------------------------- a run's Config


@dataclasses.dataclass(frozen=True)
class Section:
    """How the fields of one section of Config (Config.loss, ...) become flags."""

    prefix: str = ""  # Prepended to each field's name.
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Field -> flag name.
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Field -> default.
    # Flags default to None, "keep the base config's value" (the model: its preset's).
    optional: bool = False
    note: str = ""  # Appended to every flag's help.


# Sections not listed get their bare field names. Names that two fields would share stop
# define_run_flags; the renames keep flag names that scripts and docs already use.
RUN_SECTIONS: dict[str, Section] = {
    "model": Section(
        optional=True,
        rename={"hf_path": "model"},
        note="Unset: the --model_size preset's value.",
    ),
    "loss": Section(rename={"impl": "loss_impl"}),
    "data": Section(rename={"paths": "data"}, defaults={"cache_dir": "~/.cache/echo_jax"}),
    # eval_*: EvalConfig.batch_size would clash with TrainConfig.batch_size.
    "eval": Section(prefix="eval_", rename={"real_path": "eval_real"}),
}

# Fields, of any section, that take one of a fixed set of values (config.validate checks the
# same sets); a tuple field takes several of them.
RUN_CHOICES: dict[str, Sequence[str]] = {
    "objective": OBJECTIVES,
    "world_loss_target": C.WORLD_LOSS_TARGETS,
    "world_loss_normalization": C.WORLD_LOSS_NORMALIZATIONS,
    "pg_loss_reduction": C.PG_LOSS_REDUCTIONS,
    "advantage": C.ADVANTAGES,
    "impl": C.LOSS_IMPLS,
    "overflow": C.OVERFLOW_MODES,
    "split": C.SPLITS,
    "dtype": C.DTYPES,
    "attention": C.ATTENTION_IMPLS,
    "splits": C.EVAL_SPLITS,
}

RunFlagNames = dict[str, dict[str, str]]  # {section: {field: flag}}


def run_sections() -> dict[str, type]:
    """Config's sections: {"model": ModelConfig, "loss": LossConfig, ...}."""
    hints = typing.get_type_hints(C.Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(C.Config)}


def run_flag_names() -> RunFlagNames:
    """The flag each field of each section gets; raises if two would share one, or if
    RUN_SECTIONS or RUN_CHOICES name a section or field Config does not have."""
    sections = run_sections()
    unknown = sorted(set(RUN_SECTIONS) - sections.keys())
    if unknown:
        raise ValueError(f"RUN_SECTIONS names {', '.join(unknown)}, not sections of Config")
    all_fields = {f.name for cls in sections.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(RUN_CHOICES) - all_fields)
    if unknown:
        raise ValueError(f"RUN_CHOICES names {', '.join(unknown)}, fields of no Config section")
    owner: dict[str, str] = {}
    names: RunFlagNames = {}
    for section, cls in sections.items():
        spec = RUN_SECTIONS.get(section, Section())
        _check_fields(cls, f"RUN_SECTIONS[{section!r}].rename", list(spec.rename))
        names[section] = {}
        for f in dataclasses.fields(cls):
            name = spec.rename.get(f.name, spec.prefix + f.name)
            if name in owner:
                raise ValueError(
                    f"--{name} would set both {owner[name]} and {section}.{f.name}; give one "
                    "a prefix or a rename in RUN_SECTIONS"
                )
            owner[name] = f"{section}.{f.name}"
            names[section][f.name] = name
    return names


def define_run_flags(flag_values: flags.FlagValues = flags.FLAGS) -> RunFlagNames:
    """A flag for every field of every Config section (see RUN_SECTIONS, RUN_CHOICES), plus
    --model_size, the preset that the model's flags override. Returns {section: {field: flag}}."""
    run_flag_names()  # Every clash is reported before anything is defined.
    flags.DEFINE_enum(
        "model_size",
        "tiny",
        list(C.MODEL_PRESETS),
        "Model preset; the model's flags (--d_model, --n_layers, ...) override its fields.",
        flag_values=flag_values,
    )
    names: RunFlagNames = {}
    for section, cls in run_sections().items():
        spec = RUN_SECTIONS.get(section, Section())
        fields = {f.name for f in dataclasses.fields(cls)}
        names[section] = define_flags(
            cls,
            choices={k: v for k, v in RUN_CHOICES.items() if k in fields},
            flag_values=flag_values,
            prefix=spec.prefix,
            rename=spec.rename,
            defaults=spec.defaults,
            optional=spec.optional,
            note=spec.note,
        )
    return names


def run_config_from_flags(names: RunFlagNames, flag_values=flags.FLAGS) -> C.Config:
    """The validated Config the flags describe: the --model_size preset with the model's flags
    applied, every other section from its flags. λ belongs to the objectives it scales (echo):
    setting the λ flag with another objective is an error, and λ is 0 there."""
    loss = names["loss"]
    objective = flag_values[loss["objective"]].value
    uses_lam = objective_spec(objective).uses_lam
    if flag_values[loss["lam"]].present and not uses_lam:
        scaled = "|".join(o for o in OBJECTIVES if objective_spec(o).uses_lam)
        raise C.ConfigError(
            f"--{loss['lam']} only applies to --{loss['objective']}={scaled}, not {objective}"
        )
    base = C.Config(model=C.MODEL_PRESETS[flag_values["model_size"].value])
    cfg = dataclasses.replace(
        base,
        **{s: replace_from_flags(getattr(base, s), n, flag_values) for s, n in names.items()},
    )
    if not uses_lam:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lam=0.0))
    return C.validate(cfg)
