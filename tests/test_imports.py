"""Every public module imports first in a fresh interpreter (no import cycles that only other import orders hide)."""
import subprocess
import sys

import pytest

MODULES = ["spark3r", "spark3r.schedule", "spark3r.reduce", "spark3r.reduce.flops", "spark3r.models.registry",
           "spark3r.data", "spark3r.evaluate.schedule_eval", "spark3r.commands.profile_layers",
           "spark3r.commands.search_schedule", "spark3r.commands.make_clips", "spark3r.commands.evaluate_schedule",
           "spark3r.commands.rule_schedule"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
