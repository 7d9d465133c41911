"""One registry convention for every plug-in family: each family is a
:class:`fvsanity.registry.Registry`, and the CLI's choices are generated from it (registering a
toy entry from a test adds it to the choices; removing it takes it out again)."""

from __future__ import annotations

import pytest

from fvsanity import cli
from fvsanity.compare.similarity import METRICS, list_metrics
from fvsanity.fool import MANIPULATIONS
from fvsanity.generate.objectives import OBJECTIVES
from fvsanity.generate.optim import OPTIMIZERS
from fvsanity.generate.param import PARAMS
from fvsanity.models import LOADERS, MODELS
from fvsanity.registry import Registry, RegistryError
from fvsanity.report.writers import WRITERS

FAMILIES = {"model": MODELS, "model loader": LOADERS, "parametrization": PARAMS, "objective": OBJECTIVES,
            "optimizer": OPTIMIZERS, "metric": METRICS, "manipulation": MANIPULATIONS, "report writer": WRITERS}


def _choices(command: str, flag: str) -> list:
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    return list(next(a for a in sub._actions if flag in a.option_strings).choices)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_is_a_registry_with_one_line_errors(kind):
    reg = FAMILIES[kind]
    assert isinstance(reg, Registry) and reg.kind == kind and len(reg.names()) >= 1
    with pytest.raises(RegistryError) as e:
        reg.get("no-such-entry")
    msg = str(e.value)
    assert "\n" not in msg and f"unknown {kind} 'no-such-entry'" in msg and reg.names()[0] in msg
    first = reg.names()[0]
    with pytest.raises(RegistryError, match=f"{kind} '{first}' is already registered"):
        reg.register(first, object())
    assert reg[first] is reg.get(first)


@pytest.mark.parametrize("command, flag, names", [
    ("visualize", "--param", lambda: PARAMS.names()),
    ("visualize", "--optimizer", lambda: OPTIMIZERS.names()),
    ("fool", "--method", lambda: MANIPULATIONS.names()),
    ("check", "--metric", lambda: list_metrics(design="unpaired") + list_metrics(design="paired")),
    ("audit", "--metric", lambda: list_metrics(design="unpaired") + list_metrics(design="paired")),
    ("audit", "--paired-metrics", lambda: list_metrics(design="paired")),
])
def test_cli_choices_are_generated_from_the_registry(command, flag, names):
    assert sorted(_choices(command, flag)) == sorted(names())


def test_a_registered_entry_appears_in_the_cli_choices_and_leaves_with_it():
    def flat(size, seeds, device, *, decorrelate=True):
        raise AssertionError("not called: only the choices are read")

    with PARAMS.registered("test-registries-flat", flat):
        assert "test-registries-flat" in _choices("visualize", "--param")
    assert "test-registries-flat" not in _choices("visualize", "--param")
    assert "test-registries-flat" not in PARAMS
