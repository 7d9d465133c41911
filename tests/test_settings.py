"""Every setting declared once: flags generated from the dataclass fields that own them, their
defaults equal to the fields', config keys mapping to exactly one field, and flat names."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fvsanity.auditing import AuditSettings
from fvsanity.checking import CheckSettings, FVSettings
from fvsanity.cli import build_parser, list_commands
from fvsanity.compare.path import PathCheckSettings
from fvsanity.errors import SettingError
from fvsanity.generate import RenderSettings
from fvsanity.settings import (
    flag_owners,
    flag_specs,
    flat_json,
    flat_paths,
    from_args,
    parser_settings,
    replace_flat,
    setting,
)


def _commands() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def _get(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")]


@pytest.mark.parametrize("command", list_commands())
def test_every_generated_flag_defaults_to_its_fields_default(command):
    parser = _commands()[command]
    owners = flag_owners(parser)
    roots = parser_settings(parser)
    for cls, instance, exclude in roots:
        default = cls() if instance is None else instance
        for spec in flag_specs(cls, default, exclude=exclude):
            action = next(a for a in parser._actions if a.dest == spec.dest)
            assert owners[spec.dest] == spec
            # parsing the flag's default gives the field's default (negated, parsed, as from_args does)
            ns = argparse.Namespace(**{spec.dest: action.default})
            got = from_args(cls, ns, default, exclude=exclude)
            assert _get(got, spec.path) == _get(default, spec.path), (command, spec.flag)
        # and a command line without flags gives exactly the default settings object
        args = parser.parse_args([a for a in _required(parser)])
        assert from_args(cls, args, default, exclude=exclude) == default, command


def _required(parser):
    out = []
    for a in parser._actions:
        if a.required and a.option_strings:
            out += [a.option_strings[0], "fc:0"]
    return out


@pytest.mark.parametrize("command", list_commands())
def test_every_config_key_maps_to_exactly_one_field_or_input(command):
    """A config key is a flag's dest; a generated flag's dest names one field path, and no two
    flags of a command share a dest (argparse would refuse it) or a field."""
    parser = _commands()[command]
    owners = flag_owners(parser)
    dests = [a.dest for a in _flags(parser)]
    assert len(dests) == len(set(dests)), command
    paths = [s.path for s in owners.values()]
    assert len(paths) == len(set(paths)), command
    for cls, instance, _ in parser_settings(parser):
        default = cls() if instance is None else instance
        for s in owners.values():
            _get(default, s.path)  # every owner path is a real field


def test_commands_that_share_a_setting_share_its_flag_and_default():
    cmds = _commands()
    by_flag: dict[str, set] = {}
    for name in ("check", "audit", "visualize"):
        for dest, spec in flag_owners(cmds[name]).items():
            action = next(a for a in cmds[name]._actions if a.dest == dest)
            by_flag.setdefault(spec.flag, set()).add((spec.path[-1], repr(action.default)))
    for flag, seen in by_flag.items():
        assert len(seen) == 1, (flag, seen)  # e.g. --seeds is automatic in check, audit and visualize
    assert {("seeds", "None")} == by_flag["--seeds"]


def test_fool_flags_default_to_the_fool_settings_fields():
    from fvsanity.fool.pipeline import FoolSettings

    parser = _commands()["fool"]
    fields = {f.name: f for f in dataclasses.fields(FoolSettings)}
    d = FoolSettings()
    checked = 0
    for a in _flags(parser):
        name = a.dest[3:] if a.dest.startswith("no_") and a.dest[3:] in fields else a.dest
        if name in fields and a.dest not in ("seed",):
            want = getattr(d, name)
            got = (not a.default) if name != a.dest else a.default
            if isinstance(want, tuple) and isinstance(got, str):  # a comma-separated list flag
                want = ",".join(map(str, want))
            assert got == want, (a.option_strings[-1], got, want)
            checked += 1
    assert checked >= 4  # eval_units, eval_seeds, eval_steps, check at least


def test_flat_names_reach_the_inner_settings_and_round_trip():
    s = AuditSettings.of(steps=64, seeds=3, top_k=2, circuits=True, fv_batch_units=2, seed=9)
    assert s.render.steps == 64 and s.seeds == 3 and s.path.top_k == 2 and s.circuits.circuits
    assert s.seed == s.path.seed == 9  # one base seed: the path check follows it
    assert s.fv_seeds == [9, 10, 11]
    flat = flat_json(s)
    assert flat["batch_size"] == s.path.batch_size  # the flagged field wins a shared name
    back = replace_flat(AuditSettings(), **{k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()
                                           if k not in ("device", "progress")})
    assert back == s
    with pytest.raises(TypeError, match="unknown setting 'stpes'"):
        CheckSettings.of(stpes=3)
    assert "batch_size" in flat_paths(CheckSettings()) and flat_paths(CheckSettings())["batch_size"] == ("path", "batch_size")


def test_a_check_refuses_render_settings_it_would_ignore():
    with pytest.raises(SettingError, match="render.optimizer is not used by a check"):
        CheckSettings(render=RenderSettings(optimizer="sgd"))
    with pytest.raises(SettingError, match="layers is not an audit setting"):
        AuditSettings.of(layers=("fc",))


def test_bad_values_are_named_by_their_flag():
    parser = _commands()["check"]
    for argv, msg in ((["--steps", "0"], "--steps must be"), (["--alpha", "0.7"], r"--alpha must be in \(0, 0.5\)"),
                      (["--n-perm", "0"], "--n-perm must be in 1..1000000"), (["--seeds", "0"], "--seeds must be")):
        args = parser.parse_args(["--unit", "fc:0", *argv])
        with pytest.raises(SettingError, match=msg):
            from_args(CheckSettings, args)


def test_setting_kinds_generate_the_matching_argparse_flags():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        on: bool = setting(True, flag="--no-on", help="negated")
        names: tuple | None = setting(None, parse="names", help="names")

    @dataclasses.dataclass(frozen=True)
    class Outer:
        n: int = setting(3, bounds=(1, 5), help="a count")
        opts: dict = setting(default_factory=dict, flag="--opt", parse="options", help="options")
        steps: tuple = setting((), parse="ints", help="steps")
        pick: tuple = setting(("a",), choices=("a", "b"), help="picks")
        inner: Inner = setting(default_factory=Inner)
        hidden: int = 7

    p = argparse.ArgumentParser()
    from fvsanity.settings import add_flags

    add_flags(p, Outer)
    args = p.parse_args(["--n", "4", "--opt", "k=1.5", "--opt", "f=x.pt", "--steps", "2,8", "--pick", "a", "b",
                         "--no-on", "--names", "x, y"])
    got = from_args(Outer, args)
    assert got == Outer(n=4, opts={"k": 1.5, "f": "x.pt"}, steps=(2, 8), pick=("a", "b"), inner=Inner(on=False, names=("x", "y")))
    assert from_args(Outer, p.parse_args([])) == Outer()
    with pytest.raises(SettingError, match="--n must be in 1..5, got 9"):
        from_args(Outer, p.parse_args(["--n", "9"]))
    assert "--hidden" not in p.format_help()  # a field without help is library-only


def test_path_check_settings_flags_cover_the_check():
    specs = {s.flag for s in flag_specs(CheckSettings)}
    for flag in ("--seeds", "--steps", "--size", "--lr", "--param", "--transforms", "--diversity", "--metric",
                 "--layers", "--top-k", "--n-other", "--no-class-images", "--n-boot", "--n-perm", "--alpha",
                 "--paired-metrics", "--batch-size", "--circuits", "--circuit-images", "--circuit-steps"):
        assert flag in specs
    assert {s.flag for s in flag_specs(FVSettings)} >= {"--optimizer", "--param-opt", "--checkpoints", "--amp"}
    assert {s.path for s in flag_specs(PathCheckSettings)}.isdisjoint({("seed",), ("confidence",)})


def test_automatic_seeds_reach_both_claims_on_the_units_paths(tiny):
    from fvsanity.auditing import design_notes
    from fvsanity.checking import seeds_needed
    from fvsanity.units import parse_units

    assert [seeds_needed(n) for n in (1, 5, 11, 12)] == [5, 7, 8, 8]  # ceil(log2(n / 0.05)), at least 5
    units = parse_units(["fc:0", "relu2:3"], tiny)
    s = CheckSettings().resolved(tiny, units)
    n = max(len(tiny.path_to(u.layer)) for u in units)
    assert s.seeds == seeds_needed(n) and design_notes(s.seeds, n) == []  # no claim out of reach
    assert design_notes(s.seeds - 1, n) != []  # one fewer: "diverges" (or both) out of reach
    assert CheckSettings.of(seeds=3).resolved(tiny, units).seeds == 3  # an explicit number is kept
    assert CheckSettings.of(layers=("fc",)).resolved(tiny, units).seeds == seeds_needed(1)
    with pytest.raises(Exception, match="automatic until resolved"):
        _ = CheckSettings().fv_seeds
