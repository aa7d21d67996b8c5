"""notebooks/walkthrough.ipynb: its code cells run top to bottom as a script (small settings), without Jupyter."""
import json
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs_end_to_end(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    script = "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    (tmp_path / "walkthrough.py").write_text(script)
    env = {**os.environ, "SPARK3R_WALKTHROUGH_SMALL": "1", "SPARK3R_WALKTHROUGH_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "walkthrough.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "work" / "profile" / "profile.json").is_file()
    assert (tmp_path / "work" / "vggt-tiny-b0.05-f1000.yaml").is_file()
