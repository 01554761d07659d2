"""The notebooks: the walk-through runs top to bottom on a CPU (its cells assert what they show), and the Colab
recipe's commands are ones the scripts accept. Both are committed without outputs."""
import importlib.util
import shlex

import nbformat
import pytest

import evaluate
import finetune.settings as train_settings  # train.py builds its flags from these settings
from conftest import DEV_FILE, ROOT

NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("name", ["lora_walkthrough.ipynb", "colab_t4_recipe.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.outputs and cell.execution_count is None for cell in notebook.cells if cell.cell_type == "code")


def test_the_walkthrough_runs_every_cell_on_a_cpu(monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("SQUAD_DEV_FILE", str(DEV_FILE))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / "lora_walkthrough.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises on the first failing cell
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "trainable params: 589,824 || all params: 125,029,632" in printed and "rank 4" in printed


def test_the_colab_recipe_runs_commands_the_scripts_accept():
    notebook = nbformat.read(NOTEBOOKS / "colab_t4_recipe.ipynb", as_version=4)
    lines = [line.strip() for cell in notebook.cells if cell.cell_type == "code" for line in cell.source.splitlines()]
    commands = [shlex.split(line[1:]) for line in lines if line.startswith("!python")]
    parsers = {"train.py": train_settings.parse, "evaluate.py": evaluate.parse_args}
    checked = set()
    for command in commands:
        if command[1] == "-m":
            assert importlib.util.find_spec(command[2]) is not None, command
        else:
            parsers[command[1]](command[2:])  # exits on a flag the script does not know
        checked.add(command[1])
    assert {"train.py", "evaluate.py", "-m"} <= checked
    assert "--precision fp16" in " ".join(lines)  # the T4's path, as the seed ran
