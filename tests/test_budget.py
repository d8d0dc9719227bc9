"""Budget file: round trip, validation errors that name the field, atomic save, model/layout checks."""

from __future__ import annotations

import json
import os

import pytest

from packcache import Budget, BudgetError, SequenceLayout
from packcache.budget import decay_ratios

LAYOUT = SequenceLayout(text_tokens=6, num_frames=5, height=8, width=8, row_separator=True, frame_prefix=1,
                        frame_suffix=1)


def paper() -> Budget:
    return Budget.paper_default(4, 4, 2, LAYOUT.summary(), model_id="tiny")


def test_paper_default_is_the_papers_rule():
    budget = paper()
    assert budget.window == 4 and budget.decay["global"]["rho"] == 0.5
    assert budget.keep_ratios == [[0.5, 0.25, 0.125, 0.125]] * 4
    assert decay_ratios(0.5, 4) == [0.5, 0.25, 0.125, 0.125]
    assert sum(decay_ratios(0.3, 6)) == pytest.approx(1.0)


def test_round_trip(tmp_path):
    path = tmp_path / "budget.json"
    paper().save(path)
    loaded = Budget.load(path, num_layers=4, num_kv_heads=2)
    assert loaded.to_dict() == paper().to_dict() | {"provenance": loaded.provenance}
    assert json.loads(path.read_text())["schema"] == "packcache.budget/v1"


def _mutate(data, dotted, value):
    keys = dotted.split(".")
    target = data
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schema", "packcache.budget/v9", "schema: unknown budget schema"),
        ("window", "4", "window: expected an integer"),
        ("window", KeyError, "window: missing field"),
        ("keep_ratios.1.0", 1.5, r"keep_ratios\[1\]\[0\]: must lie in \[0, 1\]"),
        ("keep_ratios.2.3", "x", r"keep_ratios\[2\]\[3\]: expected a number"),
        ("keep_ratios.0", [0.1, 0.5, 0.1, 0.1], r"keep_ratios\[0\]: ratios must not increase"),
        ("keep_ratios.3", [0.5, 0.25], r"keep_ratios\[3\]: expected 4 ratios"),
        ("model.num_layers", 3, "keep_ratios: expected one entry per layer"),
        ("model.num_kv_heads", -1, "model.num_kv_heads: must be >= 1"),
        ("decay.model", "cubic", "decay.model: expected one of"),
        ("decay.global.rho", 2.0, r"decay.global.rho: must lie in \[0, 1\]"),
        ("positions", "shift", "positions: expected one of"),
        ("selection", "random", "selection: expected one of"),
        ("provenance", KeyError, "provenance: missing field"),
        ("anchors.groups", ["text"], "anchors.groups"),
    ],
)
def test_malformed_budget_names_the_field(tmp_path, field, value, message):
    data = paper().to_dict()
    _mutate(data, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BudgetError, match=message) as info:
        Budget.load(path)
    assert "\n" not in str(info.value)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "b.json"
    path.write_text("{not json")
    with pytest.raises(BudgetError, match="not valid JSON"):
        Budget.load(path)
    with pytest.raises(BudgetError, match="cannot read budget file"):
        Budget.load(tmp_path / "absent.json")
    path.write_text("[1, 2]")
    with pytest.raises(BudgetError, match="expected a JSON object"):
        Budget.load(path)


def test_model_and_layout_mismatch(tmp_path):
    path = tmp_path / "budget.json"
    paper().save(path)
    with pytest.raises(BudgetError, match="model.num_layers: budget is for 4 layers, the model has 2"):
        Budget.load(path, num_layers=2)
    with pytest.raises(BudgetError, match="model.num_kv_heads"):
        Budget.load(path, num_kv_heads=8)
    other = SequenceLayout(text_tokens=6, num_frames=5, height=4, width=8, row_separator=True)
    with pytest.raises(BudgetError, match="layout.height: budget was made for 8, the sequence has 4"):
        paper().check_layout(other)


def test_save_is_atomic_and_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "budget.json"
    path.write_text("OLD")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        paper().save(path)
    assert path.read_text() == "OLD"
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"], "temporary file left behind"


def test_per_kv_head_ratios():
    budget = paper()
    budget.keep_ratios = [[[0.5, 0.25, 0.125, 0.125], [1.0, 0.5, 0.0, 0.0]] for _ in range(4)]
    budget.validate()
    assert budget.per_kv_head and budget.ratios()[0][1] == [1.0, 0.5, 0.0, 0.0]
    budget.keep_ratios[2] = [[0.5, 0.25, 0.125, 0.125]]
    with pytest.raises(BudgetError, match=r"keep_ratios\[2\]: expected one list per kv head \(2\)"):
        budget.validate()
