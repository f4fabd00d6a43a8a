"""The names users import from `sia` and `realnet` resolve to the real objects, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import realnet
import sia


@pytest.mark.parametrize("package", [sia, realnet], ids=["sia", "realnet"])
def test_every_public_name_resolves_to_the_object_of_its_module(package):
    for name in package.__all__:
        value = getattr(package, name)
        assert not isinstance(value, types.ModuleType), name  # never shadowed by a submodule
        module = importlib.import_module(f"{package.__name__}.{package._EXPORTS[name]}")
        assert getattr(module, name) is value
    with pytest.raises(AttributeError, match="no attribute"):
        package.NoSuchThing  # noqa: B018


def test_import_sia_does_not_import_diffusers_or_datasets():
    code = "import sys, sia, realnet; print(any(m in sys.modules for m in ('diffusers', 'datasets', 'timm')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
