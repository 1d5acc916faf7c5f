"""examples/noop's predictor, loaded from examples/ so that the benchmark measures the same code.

(A spec's predictor.path may not point outside its project directory, hence this shim.)
"""

import importlib.util
import sys
from pathlib import Path

_FILE = Path(__file__).resolve().parents[3] / "examples" / "noop" / "predictor.py"
_spec = importlib.util.spec_from_file_location("cirrus_example_noop_predictor", _FILE)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)

Predictor = _module.Predictor
