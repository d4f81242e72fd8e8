import json

import numpy as np
import pytest
import torch

from mmcourse import record, recorded
from mmcourse.results import MIME_TYPE, read_results


def test_record_converts_and_remembers():
    record("acc_test_a", np.float32(0.5))
    record("table_test_a", {"a": torch.tensor([1, 2]), "b": (np.int64(3),)})
    assert recorded()["acc_test_a"] == 0.5
    assert recorded()["table_test_a"] == {"a": [1, 2], "b": [3]}


def test_floors_and_ceilings_fail_with_the_name():
    record("ok_test", 0.9, at_least=0.5, at_most=1.0)
    assert recorded()["ok_test"] == 0.9
    with pytest.raises(AssertionError, match="acc_floor_test = 0.3 fell below its floor 0.5"):
        record("acc_floor_test", 0.3, at_least=0.5)
    with pytest.raises(AssertionError, match="above its ceiling"):
        record("loss_ceiling_test", 2.0, at_most=1.0)
    with pytest.raises(TypeError, match="needs a number"):
        record("nan_test", float("nan"), at_least=0.0)


def test_bad_names_and_values_are_refused():
    with pytest.raises(ValueError, match="identifier"):
        record("top-1 acc", 1.0)
    with pytest.raises(TypeError, match="record\\(\\) takes"):
        record("obj_test", object())


def test_read_results_from_a_notebook(tmp_path):
    cell = {
        "cell_type": "code",
        "source": "",
        "metadata": {},
        "outputs": [
            {
                "output_type": "display_data",
                "metadata": {},
                "data": {MIME_TYPE: {"name": "x", "value": 3}},
            },
            {"output_type": "stream", "name": "stdout", "text": "hi"},
        ],
    }
    nb = {"cells": [cell, {"cell_type": "markdown", "source": "", "metadata": {}}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert read_results(path) == {"x": 3}
    assert read_results(nb) == {"x": 3}


def test_read_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no executed notebook"):
        read_results(tmp_path / "missing.ipynb")
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a notebook"):
        read_results(bad)
    with pytest.raises(ValueError, match="no 'cells'"):
        read_results({"metadata": {}})
