"""bench/gpu_check.sh is the one-call bundle of bench/gpu_check/: it must be rebuilt after a source changes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bundle_is_built_from_the_current_sources():
    spec = importlib.util.spec_from_file_location("gpu_check_build", ROOT / "bench" / "gpu_check" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert (ROOT / "bench" / "gpu_check.sh").read_text() == build.assemble(), \
        "bench/gpu_check.sh is stale: run python bench/gpu_check/build.py"
