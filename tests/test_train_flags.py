"""experiments.train's flags come from the config dataclasses: one per field, help from the
field's comment, enums for fixed choices, and every field settable from the command line."""

import dataclasses

import pytest
from absl import flags
from absl.testing import flagsaver

from echo_jax import config as C
from echo_jax import config_flags
from echo_jax.config_flags import define_run_flags, field_help, run_config_from_flags
from tests.cli import run_module


def _parse(*argv: str) -> C.Config:
    fv = flags.FlagValues()
    names = define_run_flags(fv)
    fv(["train", *argv])
    return run_config_from_flags(names, fv)


def _squeezed(text: str) -> str:
    """Without whitespace: --help wraps lines (also after hyphens)."""
    return "".join(text.split())


def test_help_lists_every_field_with_its_comment():
    proc = run_module("experiments.train", "--help", timeout=120)
    out, squeezed = " ".join(proc.stdout.split()), _squeezed(proc.stdout)
    names = config_flags.run_flag_names()
    for section, cls in config_flags.run_sections().items():
        for f in dataclasses.fields(cls):
            flag = names[section][f.name]
            spelled = f"--[no]{flag}:" if f.type in (bool, "bool") else f"--{flag}:"
            assert spelled in out, f"{section}.{f.name}: no {spelled} in --help"
            assert _squeezed(field_help(cls)[f.name]) in squeezed, f"{section}.{f.name}: help"
    for name in ("workdir", "resume", "model_size", "coordinator_address", "process_id"):
        assert f"--{name}:" in out or f"--[no]{name}:" in out, name


def test_every_loss_train_and_model_field_has_its_own_flag():
    names = config_flags.run_flag_names()
    for section, cls in (
        ("loss", C.LossConfig),
        ("train", C.TrainConfig),
        ("model", C.ModelConfig),
    ):
        assert set(names[section]) == {f.name for f in dataclasses.fields(cls)}
    every = [flag for section in names.values() for flag in section.values()]
    assert len(every) == len(set(every))


def test_defaults_are_the_config_defaults():
    want = C.Config(data=dataclasses.replace(C.DataConfig(), cache_dir="~/.cache/echo_jax"))
    assert _parse() == want


def test_formerly_missing_fields_reach_the_config():
    cfg = _parse(
        "--weight_decay=0.25",
        "--warmup_steps=3",
        "--grad_clip=0.5",
        "--keep_checkpoints=5",
        "--clip_eps=0.1",
        "--dtype=bfloat16",
        "--notie_embeddings",
        "--split=heldout_tasks",
        "--vocab_min_count=2",
        "--eval_batch_size=2",
        "--eval_success_reward=0.5",
    )
    assert (cfg.train.weight_decay, cfg.train.warmup_steps) == (0.25, 3)
    assert (cfg.train.grad_clip, cfg.train.keep_checkpoints) == (0.5, 5)
    assert cfg.loss.clip_eps == 0.1
    assert (cfg.model.dtype, cfg.model.tie_embeddings) == ("bfloat16", False)
    assert (cfg.data.split, cfg.data.vocab_min_count) == ("heldout_tasks", 2)
    assert (cfg.eval.batch_size, cfg.eval.success_reward) == (2, 0.5)
    assert cfg.train.batch_size == C.TrainConfig().batch_size  # Not eval's.


def test_the_existing_flag_names_still_work():
    cfg = _parse(
        "--data=a.jsonl,b.jsonl",
        "--loss_impl=plain",
        "--eval_real=r.json",
        "--eval_splits=",
        "--eval_every=5",
        "--eval_max_rows=7",
        "--cache_dir=",
        "--chunk_size=64",
        "--steps=9",
        "--log_every=3",
        "--checkpoint_every=3",
    )
    assert cfg.data.paths == ("a.jsonl", "b.jsonl")
    assert (cfg.loss.impl, cfg.loss.chunk_size, cfg.data.cache_dir) == ("plain", 64, "")
    assert cfg.eval == dataclasses.replace(
        C.EvalConfig(), real_path="r.json", splits=(), every=5, max_rows=7
    )
    assert (cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every) == (9, 3, 3)


def test_model_flags_override_the_preset_only_where_given():
    cfg = _parse("--model_size=small", "--n_layers=3", "--attention=xla")
    assert cfg.model == dataclasses.replace(C.MODEL_PRESETS["small"], n_layers=3, attention="xla")


def test_lam_belongs_to_echo():
    assert _parse("--objective=grpo").loss.lam == 0.0
    assert _parse("--lam=0.2").loss.lam == 0.2
    with pytest.raises(C.ConfigError, match="--lam only applies to --objective=echo"):
        _parse("--objective=grpo", "--lam=0.1")


@pytest.mark.parametrize(
    "arg", ["--dtype=float16", "--advantage=baseline", "--split=test", "--eval_splits=train,x"]
)
def test_fixed_choices_refuse_other_values(arg):
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(arg)


def test_a_name_clash_or_a_stale_name_is_refused(monkeypatch):
    no_prefix = dict(config_flags.RUN_SECTIONS, eval=config_flags.Section())
    monkeypatch.setattr(config_flags, "RUN_SECTIONS", no_prefix)
    with pytest.raises(ValueError, match="--batch_size would set both train.batch_size"):
        config_flags.run_flag_names()
    monkeypatch.undo()
    stale = dict(config_flags.RUN_CHOICES, no_such_field=("a",))
    monkeypatch.setattr(config_flags, "RUN_CHOICES", stale)
    with pytest.raises(ValueError, match="no_such_field"):
        config_flags.run_flag_names()


def test_the_entry_point_reads_its_flags_into_the_config():
    from experiments import train as train_cli

    with flagsaver.flagsaver():
        train_cli.FLAGS(["train", "--weight_decay=0.125", "--steps=8", "--log_every=2"])
        cfg = train_cli.config_from_flags()
    assert (cfg.train.weight_decay, cfg.train.steps, cfg.train.log_every) == (0.125, 8, 2)
