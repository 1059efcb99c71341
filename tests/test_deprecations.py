"""pyproject.toml's filterwarnings: a DeprecationWarning from jax, flax, optax or orbax fails a test.

A library warns in one of two ways, and Python attributes the warning to a different module in each:
without a stacklevel (optax.global_norm) to the library's own module, with stacklevel=2 (jax's and
flax's deprecations) to the caller's, here this test module. Both must be errors. The libraries'
calls are stood in for by code compiled as their modules, so that the test does not depend on which
API a release happens to deprecate.
"""

import warnings

import pytest

_LIBRARY_MODULES = ["jax._src.deprecations", "jax.numpy", "flax.linen.module", "optax._src.linear_algebra",
                    "orbax.checkpoint.checkpointer"]


def _library(module_name):
  """A namespace whose functions warn as functions of `module_name` do."""
  namespace = {"__name__": module_name, "warnings": warnings}
  exec(compile(  # pylint: disable=exec-used
      "def own():\n  warnings.warn('old API', DeprecationWarning)\n"
      "def callers():\n  warnings.warn('old API', DeprecationWarning, stacklevel=2)\n",
      module_name.replace(".", "/") + ".py", "exec"), namespace)
  return namespace


@pytest.fixture(autouse=True)
def _ini_filters_only(request):
  if request.config.getoption("pythonwarnings"):
    pytest.skip("-W on the command line overrides pyproject.toml's filterwarnings")


@pytest.mark.parametrize("module_name", _LIBRARY_MODULES)
def test_a_library_deprecation_is_an_error(module_name):
  lib = _library(module_name)
  with pytest.raises(DeprecationWarning, match="old API"):
    lib["own"]()  # attributed to the library's module
  with pytest.raises(DeprecationWarning, match="old API"):
    lib["callers"]()  # attributed to this module, the caller


def test_other_libraries_deprecations_only_show():
  """A third-party library's own deprecations (not our calls) are reported, not errors."""
  lib = _library("some_other_library.module")
  with warnings.catch_warnings(record=True) as caught:  # the filters in force stay as they are
    lib["own"]()
  assert [str(w.message) for w in caught] == ["old API"]
