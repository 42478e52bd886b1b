"""The Colab notebooks: each runs top to bottom headless in its CI setting, none is committed
with outputs, and the README's Colab badges point at notebooks that exist."""

import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
# In run order: inspect_checkpoint opens the quickstart's checkpoint.
RUN_ORDER = ("quickstart", "inspect_checkpoint", "maect_three_stages")
COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/cmae-jax/cmae_jax/blob/main/notebooks/"
    r"([\w-]+\.ipynb)"
)
REPO_URL = "https://github.com/cmae-jax/cmae_jax"


def notebook_paths() -> list[str]:
    """Every committed notebook."""
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def test_every_notebook_runs_in_ci():
    assert sorted(f"{name}.ipynb" for name in RUN_ORDER) == [
        os.path.basename(p) for p in notebook_paths()
    ]


@pytest.mark.parametrize("path", notebook_paths(), ids=os.path.basename)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_readme_badges_point_at_the_notebooks():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Notebooks (Colab)", 1)[1].split("\n## ", 1)[0]
    linked = COLAB_LINK.findall(section)
    assert sorted(linked) == sorted(os.path.basename(p) for p in notebook_paths())
    assert section.count("https://colab.research.google.com/assets/colab-badge.svg") == len(linked)
    assert REPO_URL in readme


@pytest.mark.parametrize("path", notebook_paths(), ids=os.path.basename)
def test_notebook_installs_from_the_published_repository(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert code.count(f'REPO_URL = "{REPO_URL}"') == 1
    assert 'find_spec("cmae_jax") is None' in code
    assert "accelerator.describe()" in code
    # The parameters come first, the CI setting from the environment.
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'os.environ.get("CMAE_NOTEBOOK_CI")' in first


@pytest.fixture(scope="module")
def notebook_env(small_fashion_mnist, tmp_path_factory):
    """The kernels' environment: the CI setting, the small IDX folder, a shared workdir root."""
    root = tmp_path_factory.mktemp("notebooks")
    return {
        "CMAE_NOTEBOOK_CI": "1",
        "CMAE_NOTEBOOK_IDX_DIR": small_fashion_mnist,
        "CMAE_NOTEBOOK_WORKDIR": str(root / "workdirs"),
        # This checkout's package, wherever the kernel starts.
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }, root


@pytest.mark.parametrize("name", RUN_ORDER)
def test_notebook_executes(name, notebook_env, monkeypatch):
    env, root = notebook_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(root)}},  # the kernel's working folder
    )
    try:
        client.execute()
    finally:
        # Executed copies for inspection go to the tmp folder, never into notebooks/.
        nbformat.write(nb, str(root / f"{name}.executed.ipynb"))
    text = "\n".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "stream"
    )
    assert "JAX uses" in text
    if name == "quickstart":
        assert re.search(r"k-NN top-1 after 6 steps: \d+\.\d\d%", text)
    if name == "inspect_checkpoint":
        assert "mask ratio 0.9:" in text
        images = [
            output
            for cell in nb.cells
            if cell.cell_type == "code"
            for output in cell.outputs
            if "image/png" in output.get("data", {})
        ]
        assert len(images) == 5  # three reconstruction grids, attention, embedding
    if name == "maect_three_stages":
        assert all(re.search(rf"{s}\s+k-NN top-1", text) for s in ("1_mae", "2_head", "3_tune"))
