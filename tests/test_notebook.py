"""notebooks/inference.ipynb runs headless, top to bottom, on the tiny fixture weights."""

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inference.ipynb"


def _outputs(nb, output_type=None):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if output_type is None or o.output_type == output_type]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert _outputs(nb) == []
    assert all(c.execution_count is None for c in nb.cells if c.cell_type == "code")


# Appended to the notebook: the interpreter the kernel runs, and the PSNR recomputed from
# the notebook's own arrays by the plain formula on the [0, 1] range.
CHECKS = """import sys
print("kernel python:", sys.executable)
a, b = (np.clip((v + 1) / 2, 0, 1) for v in (x[0, :n_source], recon))
print(f"check PSNR: {np.mean(-10 * np.log10(((a - b) ** 2).mean(axis=(1, 2, 3)))):.2f}")"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS))
    cwd = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
        mp.setenv("CVVAE_WEIGHTS", str(FIXTURES / "cvvae_v1_tiny"))
        mp.setenv("CVVAE_SUBFOLDER", "")
        # 6 frames pad to 9; 48x64 keeps the one compilation per direction short.
        mp.setenv("CVVAE_FRAMES", "6")
        mp.setenv("CVVAE_SIZE", "48x64")
        mp.setenv("JAX_PLATFORMS", "cpu")
        # The kernel imports the package from this checkout, installed or not.
        mp.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)
        # "python3" resolves to the running interpreter (jupyter_client swaps in sys.executable).
        NotebookClient(nb, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    text = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
    return nb, text, cwd


def test_notebook_runs_with_this_python(executed):
    nb, text, _ = executed
    assert _outputs(nb, "error") == []
    assert f"kernel python: {sys.executable}" in text


def test_notebook_shows_psnr_frames_and_video(executed):
    nb, text, cwd = executed
    assert "frames: 6 -> 9 (padded 3" in text
    assert "video (1, 9, 48, 64, 3) -> latents (1, 3, 6, 8, 4) -> video (6, 48, 64, 3)" in text
    psnr = text.split("\nPSNR: ")[1].split(" dB (mean over 6 frames)")[0]
    assert psnr == text.split("check PSNR: ")[1].split()[0]
    assert 5 < float(psnr) < 30  # the tiny random model: far from both a copy and noise
    rich = _outputs(nb, "display_data")
    assert any("image/png" in o.data for o in rich)
    assert any("<video" in o.data.get("text/html", "") for o in rich)
    assert (cwd / "outputs" / "notebook" / "side_by_side.mp4").stat().st_size > 0
