import pytest
import torch

from nimble_worker.task import Task, TaskError


def write(tmp_path, body, name="mytask.py"):
    p = tmp_path / name
    p.write_text("import torch\nimport torch.nn as nn\n" + body)
    return str(p)


OK = """
def build_model(args):
    return nn.Linear(3, 2)

def build_dataset(split, args):
    return [(torch.randn(3), 1)] * 4
"""


def test_missing_file(tmp_path):
    with pytest.raises(TaskError) as e:
        Task(str(tmp_path / "nope.py"), {})
    assert e.value.where == "nope.py: load" and "not found" in e.value.message


def test_missing_function(tmp_path):
    path = write(tmp_path, "def build_model(args):\n    return nn.Linear(1, 1)\n")
    with pytest.raises(TaskError) as e:
        Task(path, {})
    assert e.value.where == "mytask.py: build_dataset"
    assert "must define build_dataset" in e.value.message


def test_import_error_reports_traceback(tmp_path):
    path = write(tmp_path, "import not_a_module_xyz\n")
    with pytest.raises(TaskError) as e:
        Task(path, {})
    assert e.value.where == "mytask.py: import" and "not_a_module_xyz" in e.value.message


def test_function_raising_includes_traceback_tail(tmp_path):
    path = write(tmp_path, OK.replace("return nn.Linear(3, 2)",
                                      "width = args['width']\n    return nn.Linear(3, width)"))
    with pytest.raises(TaskError) as e:
        Task(path, {}).build_model()
    assert e.value.where == "mytask.py: build_model"
    assert "KeyError: 'width'" in e.value.message
    assert "mytask.py" in e.value.message and "width = args['width']" in e.value.message


def test_wrong_return_types(tmp_path):
    path = write(tmp_path, OK.replace("return nn.Linear(3, 2)", "return 42")
                 .replace("return [(torch.randn(3), 1)] * 4", "return 7"))
    task = Task(path, {})
    with pytest.raises(TaskError, match="torch.nn.Module, got int") as e:
        task.build_model()
    assert e.value.where == "mytask.py: build_model"
    with pytest.raises(TaskError, match="__len__") as e:
        task.build_dataset("train")
    assert e.value.where == "mytask.py: build_dataset"


def test_non_scalar_loss(tmp_path):
    path = write(tmp_path, OK + """
def compute_loss(model, batch):
    x, y = batch
    return model(x)
""")
    task = Task(path, {})
    model = task.build_model()
    with pytest.raises(TaskError) as e:
        task.compute_loss(model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    assert e.value.where == "mytask.py: compute_loss"
    assert "scalar tensor" in e.value.message and "(4, 2)" in e.value.message


def test_defaults_for_loss_and_evaluate(tmp_path):
    task = Task(write(tmp_path, OK), {"a": 1})
    model = task.build_model()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    expected = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(task.compute_loss(model, (x, y)), expected)
    assert task.evaluate(model, (x, y)) == {"loss": pytest.approx(expected.item())}


def test_evaluate_must_return_numbers(tmp_path):
    path = write(tmp_path, OK + "\ndef evaluate(model, batch):\n    return {'acc': 'high'}\n")
    task = Task(path, {})
    with pytest.raises(TaskError, match="'acc' is not a number") as e:
        task.evaluate(task.build_model(), (torch.randn(2, 3), torch.tensor([0, 1])))
    assert e.value.where == "mytask.py: evaluate"


def test_a_metric_name_too_long_to_keep_is_a_task_error_not_a_dropped_provider(tmp_path):
    import torch
    path = tmp_path / "long.py"
    path.write_text("import torch\n"
                    "def build_model(args):\n    return torch.nn.Linear(2, 1)\n"
                    "def build_dataset(split, args):\n    return [(torch.zeros(2), 0)]\n"
                    "def evaluate(model, batch):\n    return {'x' * 200: 1.0}\n")
    t = Task(str(path), {})
    with pytest.raises(TaskError, match="is 200 characters; at most 128") as e:
        t.evaluate(t.build_model(), (torch.zeros(1, 2), torch.zeros(1)))
    assert e.value.where == "long.py: evaluate"
