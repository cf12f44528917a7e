"""The layers of mae_jax (.importlinter, as `lint-imports` checks them): every import points down,
function-local ones included, and no package's modules import each other in a cycle."""
import os

import grimp
import pytest
from importlinter import configuration
from importlinter.application import use_cases
from importlinter.contracts.layers import LayersContract

from tests.helpers import REPO

CONFIG = os.path.join(REPO, ".importlinter")
configuration.configure()  # what the lint-imports command does first


def test_lint_imports_keeps_every_contract(capsys):
  kept = use_cases.lint_imports(CONFIG, cache_dir=None, is_debug_mode=True, no_logo=True)
  out = capsys.readouterr().out
  assert kept, out
  assert "0 broken" in out


@pytest.fixture(name="layers")
def _layers():
  options = use_cases.read_user_options(CONFIG)
  spec = next(c for c in options.contracts_options if c["type"] == "layers")
  return LayersContract(name=spec["name"], session_options=options.session_options,
                        contract_options=spec)


def test_an_upward_import_breaks_the_layers(layers):
  graph = grimp.build_graph("mae_jax", cache_dir=None)
  assert layers.check(graph, verbose=False).kept
  graph.add_import(importer="mae_jax.data.config", imported="mae_jax.training.trainer")
  assert not layers.check(graph, verbose=False).kept


def test_the_graph_holds_function_local_imports(tmp_path, monkeypatch):
  package = tmp_path / "layered_probe"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "low.py").write_text("def later():\n  from layered_probe import high\n  return high\n")
  (package / "high.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  graph = grimp.build_graph("layered_probe", cache_dir=None)
  assert graph.direct_import_exists(importer="layered_probe.low", imported="layered_probe.high")
