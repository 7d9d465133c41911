"""The generator's plug-in seams: the registry convention, parametrizations (fft, pixel, MACO),
objectives (lucent's algebra), optimizers, RenderSettings; toy entries registered from this file
and run through the CLI."""

import pytest

from fvsanity.errors import FVSanityError
from fvsanity.registry import Registry, RegistryError


# -- the registry convention -------------------------------------------------------------------
def test_registry_register_get_names_contains():
    reg = Registry("widget")
    assert reg.names() == () and "a" not in reg and len(reg) == 0

    @reg.register("alpha")
    def alpha():
        return 1

    beta = reg.register("beta", lambda: 2)
    assert alpha() == 1 and reg.get("alpha") is alpha and reg.get("beta") is beta
    assert reg.names() == ("alpha", "beta")  # registration order
    assert "alpha" in reg and "gamma" not in reg and 3 not in reg
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2


def test_registry_refuses_duplicates_and_names_unknowns():
    reg = Registry("widget")
    reg.register("alpha", object())
    reg.register("beta", object())
    with pytest.raises(RegistryError) as e:
        reg.register("alpha", object())
    msg = str(e.value)
    assert "\n" not in msg and "'alpha' is already registered" in msg and "alpha, beta" in msg
    assert isinstance(e.value, FVSanityError)

    with pytest.raises(RegistryError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert msg == "unknown widget 'alpah'; did you mean 'alpha'? (choices: alpha, beta)"
    with pytest.raises(RegistryError) as e:
        reg.get("zzz")
    assert str(e.value) == "unknown widget 'zzz' (choices: alpha, beta)"
    with pytest.raises(RegistryError, match="non-empty string"):
        reg.register("", object())


def test_registry_unregister_and_registered_context_undo_themselves():
    reg = Registry("widget")
    o = object()
    reg.register("alpha", o)
    assert reg.unregister("alpha") is o and "alpha" not in reg
    with pytest.raises(RegistryError, match="unknown widget 'alpha'"):
        reg.unregister("alpha")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with reg.registered("toy", o) as got:
            assert got is o and reg.get("toy") is o
            raise Boom
    assert "toy" not in reg
