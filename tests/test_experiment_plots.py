"""Plot and table helpers on synthetic metrics rows."""
import json
import math

import pytest

from dhkd.experiments.plots import (
    final_value,
    load_metrics,
    markdown_table,
    plot_accuracy,
    plot_diagnostics,
    series,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(seed, epochs=4, aux=True, offset=0.0):
    rows = []
    for e in range(1, epochs + 1):
        rows.append({"epoch": e, "step": 10 * e, "train/loss": 1.0 / e})  # a training row without acc
        row = {"epoch": e, "val/acc1_main": 50.0 + 5 * e + seed + offset,
               "diag/main/norm_cv": 0.5 / e, "diag/main/cos_etf_gap": 0.1 / e, "diag/main/nc1": 2.0 / e,
               "diag/grad_cos": 0.1 * seed - 0.05}
        if aux:
            row.update({"val/acc1_aux": 40.0 + 5 * e, "diag/aux/norm_cv": 0.3, "diag/aux/nc1": 2.0 / e})
        rows.append(row)
    return rows


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_series_and_final_value():
    run = synthetic_run(seed=1)
    run.append({"epoch": 2, "val/acc1_main": 99.0})  # a later row for epoch 2 wins
    run.append({"epoch": 5, "val/acc1_main": True})  # booleans are not numbers
    xs, ys = series(run, "val/acc1_main")
    assert xs == [1, 2, 3, 4]
    assert ys == [56.0, 99.0, 66.0, 71.0]
    assert final_value(run, "val/acc1_main") == 99.0
    with pytest.raises(KeyError, match="nope"):
        final_value(run, "nope")


def test_load_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "val/acc1_main": 50.0}) + "\n\n" + json.dumps({"epoch": 2}) + "\n")
    assert load_metrics(path) == [{"epoch": 1, "val/acc1_main": 50.0}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\n{"epoch": 2\n')
    with pytest.raises(ValueError, match=":2:"):
        load_metrics(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="JSON object"):
        load_metrics(path)


def test_summarize():
    mean, std, n = summarize([70.0, 72.0, 74.0])
    assert (mean, n) == (72.0, 3)
    assert std == pytest.approx(2.0, abs=1e-12)  # sample std
    mean, std, n = summarize([65.5])
    assert mean == 65.5 and math.isnan(std) and n == 1
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, float("nan")])


def test_markdown_table_means_and_stds():
    results = {
        "ce": {"main": [70.0, 72.0, 74.0], "aux": [1.0, 2.0, 3.0]},
        "ce_binary_kl": {"main": [60.25, 60.75]},
        "kd": {"main": [65.5]},
    }
    text = markdown_table(results, digits=2)
    lines = text.strip().splitlines()
    assert lines[0] == "| method | main | aux | seeds |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| ce | 72.00 ± 2.00 | 2.00 ± 1.00 | 3 |"
    assert lines[3] == "| ce_binary_kl | 60.50 ± 0.35 | – | 2 |"
    assert lines[4] == "| kd | 65.50 | – | 1 |"
    assert markdown_table(results, columns=["aux"], digits=1).splitlines()[2] == "| ce | 2.0 ± 1.0 | 3 |"


def test_markdown_table_from_runs():
    runs = {m: [synthetic_run(s, offset=off) for s in range(3)] for m, off in (("ce", 0.0), ("dhkd", 1.0))}
    results = {m: {"main acc": [final_value(r, "val/acc1_main") for r in rs]} for m, rs in runs.items()}
    lines = markdown_table(results).splitlines()
    assert lines[2] == "| ce | 71.00 ± 1.00 | 3 |"  # final epoch 4: 70 + seed, seeds 0..2
    assert lines[3] == "| dhkd | 72.00 ± 1.00 | 3 |"


def test_markdown_table_bad_input():
    with pytest.raises(ValueError, match="results"):
        markdown_table({})
    with pytest.raises(ValueError, match="results"):
        markdown_table({"ce": [1.0, 2.0]})


def test_plot_accuracy_writes_png(tmp_path):
    pytest.importorskip("matplotlib")  # the "train" extra
    runs = {"ce": [synthetic_run(s) for s in range(3)], "dhkd": synthetic_run(0, offset=2.0)}  # single run too
    out = plot_accuracy(runs, tmp_path / "sub" / "acc.png", title="MNIST-1D")
    assert out == str(tmp_path / "sub" / "acc.png")
    assert_png(tmp_path / "sub" / "acc.png")
    plot_accuracy(runs, tmp_path / "acc2.png", keys=("val/acc1_main", "val/acc1_aux"))
    assert_png(tmp_path / "acc2.png")
    assert not [p for p in tmp_path.rglob("tmp*")]  # no temporary file left behind


def test_plot_diagnostics_writes_png(tmp_path):
    pytest.importorskip("matplotlib")  # the "train" extra
    runs = {"ce": [synthetic_run(s, aux=False) for s in range(2)], "dhkd": [synthetic_run(s) for s in range(2)]}
    plot_diagnostics(runs, tmp_path / "diag.png", keys=("norm_cv", "cos_etf_gap", "nc1", "cos_std"),
                     extra_keys=("diag/grad_cos",))  # cos_std has no data: that panel says so
    assert_png(tmp_path / "diag.png")


def test_plots_with_no_data_raise(tmp_path):
    pytest.importorskip("matplotlib")  # the "train" extra
    runs = {"ce": [[{"epoch": 1, "train/loss": 1.0}]]}
    with pytest.raises(ValueError, match="val/acc1_main"):
        plot_accuracy(runs, tmp_path / "a.png")
    with pytest.raises(ValueError, match="diag/main/nc1"):
        plot_diagnostics(runs, tmp_path / "d.png", keys=("nc1",))
    with pytest.raises(ValueError, match="runs_by_method"):
        plot_accuracy({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="runs_by_method"):
        plot_accuracy({"ce": [[1, 2]]}, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
