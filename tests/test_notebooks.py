"""The ablation notebooks: committed with the outputs of their run in full (or none), and they
run end to end in their small mode.

Each notebook is executed in a fresh kernel with GRPO_JAX_NOTEBOOK_SMALL=1 (the `runlocal`
configs, one seed); they share one persistent compilation cache, so programs that do not change between
variants (warm start, sampler, evaluation) compile once. The kernel sees one CPU device.
"""

import glob
import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from grpo_jax import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]


def test_the_ablation_notebooks_exist():
    assert {"loss_ablation.ipynb", "rubric_ablation.ipynb", "dynamic_sampling.ipynb", "off_policy.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_notebook_is_clear_or_a_clean_run(path):
    """A notebook is committed with the outputs of its run in full (or none): no error output,
    every code cell run once, in order."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    if any(count is not None for count in counts):
        assert counts == list(range(1, len(code) + 1)), f"cells were not run once each, in order: {counts}"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], "an error output"
    else:
        assert all(c.outputs == [] for c in code), "outputs without execution counts"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_imports_the_library_and_defines_nothing(path):
    """Notebooks hold configuration and calls only: their logic lives in grpo_jax."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from grpo_jax import" in code
    for keyword in ("def ", "class ", "lambda ", "for ", "while "):
        assert keyword not in code, f"{os.path.basename(path)} has {keyword.strip()!r}: move it to grpo_jax"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    env = dict(os.environ)
    env["GRPO_JAX_NOTEBOOK_SMALL"] = "1"
    env["GRPO_JAX_NOTEBOOK_WORKDIR"] = str(tmp_path_factory.mktemp("notebook_runs"))
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one device: the notebooks' setting, and faster than 8 simulated ones
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_in_small_mode_and_plots(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute(env=kernel_env)  # raises CellExecutionError, with the traceback, if a cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1, "one figure of curves"
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and tables[0].startswith("| variant |")
    # One row per variant in the table, each with finite numbers (the runs trained and evaluated).
    variant_rows = tables[0].splitlines()[2:]
    assert len(variant_rows) >= 2 and all("| - " not in row for row in variant_rows), tables[0]
    name = os.path.splitext(os.path.basename(path))[0]
    workdir = os.path.join(kernel_env["GRPO_JAX_NOTEBOOK_WORKDIR"], name + "_small")
    assert os.path.exists(os.path.join(workdir, f"{name}.png"))
    assert len(glob.glob(os.path.join(workdir, "*", "metrics.jsonl"))) == len(variant_rows)

    # strip_outputs clears an executed notebook (and only once); its cells are the committed ones.
    executed = os.path.join(kernel_env["GRPO_JAX_NOTEBOOK_WORKDIR"], os.path.basename(path))
    nbformat.write(nb, executed)
    assert ablation.strip_outputs(executed) and not ablation.strip_outputs(executed)
    stripped, committed = nbformat.read(executed, as_version=4), nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] for c in stripped.cells)
    assert [(c.cell_type, c.source) for c in stripped.cells] == [(c.cell_type, c.source) for c in committed.cells]


# -- grpo_jax.ablation, the notebooks' helpers ------------------------------------------------

def test_with_overrides_sets_fields_on_a_copy_and_rejects_typos():
    base = ablation.load_config("arithmetic_tiny", "runlocal")
    config = ablation.with_overrides(base, {"grpo.loss_type": "dapo", "grpo.epsilon_high": 0.28,
                                            "env.rubric_weights": {"strict_format": 0.0}})
    assert (config.grpo.loss_type, config.grpo.epsilon_high) == ("dapo", 0.28)
    assert config.env.rubric_weights.to_dict() == {"strict_format": 0.0}
    assert (base.grpo.loss_type, base.grpo.epsilon_high) == ("grpo", None)  # the base is untouched
    assert config.is_locked
    with pytest.raises(KeyError, match="grpo.bta"):
        ablation.with_overrides(base, {"grpo.bta": 0.1})
    with pytest.raises(KeyError, match="grpox"):
        ablation.with_overrides(base, {"grpox.beta": 0.1})
    with pytest.raises(TypeError):
        ablation.with_overrides(base, {"grpo.loss_type": 3})


def test_sweep_validates_every_variant_before_training_any(tmp_path):
    base = ablation.load_config("arithmetic_tiny", "runlocal")
    variants = {"fine": {"grpo.loss_type": "grpo"}, "bad": {"grpo.loss_type": "cispo"}}  # no epsilon_high
    with pytest.raises(ValueError, match="epsilon_high"):
        ablation.sweep(base, variants, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing ran
    with pytest.raises(ValueError, match="same directory"):
        ablation.sweep(base, {"a b": {}, "a/b": {}}, str(tmp_path))


def test_a_workdir_of_another_config_is_refused(tmp_path):
    base = ablation.load_config("arithmetic_tiny", "runlocal")
    ablation._check_workdir(str(tmp_path), base)
    ablation._check_workdir(str(tmp_path), base)  # the same config: reused
    with pytest.raises(ValueError, match="different config.*grpo"):
        ablation._check_workdir(str(tmp_path), ablation.with_overrides(base, {"grpo.loss_type": "dapo"}))


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(ablation.moving_average([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(ablation.moving_average([1.0, 3.0, 5.0, 7.0], 3), [1.0, 2.0, 3.0, 5.0])
    np.testing.assert_allclose(ablation.moving_average([2.0, 4.0], 1), [2.0, 4.0])
    assert ablation.moving_average([], 5).size == 0


def _rows(rewards, accuracies):
    rows = [{"step": 0, "eval/accuracy": accuracies[0]}]
    rows += [{"step": s + 1, "reward": r, "loss": 0.0} for s, r in enumerate(rewards)]
    rows.append({"step": len(rewards), "eval/accuracy": accuracies[1]})
    return rows


def test_curve_table_and_plot_from_metric_rows(tmp_path):
    results = {"a": _rows([0.1, 0.2, float("nan"), 0.6], (0.25, 0.5)), "b": _rows([0.0, 0.0], (0.1, 0.1))}
    steps, values = ablation.curve(results["a"], "reward")  # NaN steps are left out
    np.testing.assert_array_equal(steps, [1, 2, 4])
    np.testing.assert_allclose(values, [0.1, 0.2, 0.6])
    np.testing.assert_array_equal(ablation.curve(results["a"], "eval/accuracy")[0], [0, 4])
    assert ablation.curve(results["b"], "kl")[0].size == 0

    table = ablation.results_table(results, train_keys=("reward", "kl"), last=2).splitlines()
    assert table[0] == ("| variant | eval/accuracy before | eval/accuracy after | reward (last 2 steps) "
                        "| kl (last 2 steps) |")
    assert table[2] == "| a | 0.250 | 0.500 | 0.400 | - |"
    assert table[3] == "| b | 0.100 | 0.100 | 0.000 | - |"

    path = str(tmp_path / "curves.png")
    fig = ablation.plot_curves(results, keys=("reward", "eval/accuracy"), smooth=2, path=path)
    assert len(fig.axes) == 2 and os.path.getsize(path) > 0
    reward_lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in reward_lines] == ["a", "b"]
    np.testing.assert_allclose(reward_lines[0].get_ydata(), [0.1, 0.15, 0.4])  # smoothed
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [0.25, 0.5])  # eval: as is


def test_seeded_sweeps_tables_and_separation():
    variants = ablation.seeded({"a": {"grpo.beta": 0.1}, "b": {}}, (0, 1, 2))
    assert list(variants) == ["a@0", "b@0", "a@1", "b@1", "a@2", "b@2"]  # seed by seed
    assert variants["b@1"] == {"seed": 1}
    with pytest.raises(ValueError, match="@"):
        ablation.seeded({"a@b": {}}, (0,))
    accuracy = {"a": (0.9, 0.8, 0.95), "b": (0.5, 0.7, 0.6), "c": (0.85, 0.75, 0.5)}
    results = {f"{v}@{s}": [{"step": 10, "eval/accuracy": accuracy[v][s]}]
               + [{"step": k, "reward": accuracy[v][s] + k} for k in (1, 2, 3)]
               for v in accuracy for s in (0, 1, 2)}
    assert set(ablation.by_seed(results)) == {"a", "b", "c"}
    values = ablation.seed_values(results, "eval/accuracy")
    np.testing.assert_allclose(values["c"], [0.85, 0.75, 0.5])
    assert ablation.separated(values) == [("a", "b")]  # a's worst (0.8) above b's best (0.7)
    assert set(ablation.above_in_every_seed(values)) == {("a", "b"), ("a", "c")}
    assert ablation.final_value(results["a@0"], "reward", steps_between=(2, 3)) == pytest.approx(0.9 + 2.5)
    assert ablation.final_value(results["a@0"], "reward", last=2) == pytest.approx(0.9 + 2.5)
    assert np.isnan(ablation.final_value(results["a@0"], "eval/accuracy", step=20))
    columns = {"accuracy": ("eval/accuracy", {})}
    table = ablation.seed_table(results, columns)
    assert "| a | 0,1,2 | 0.883 +- 0.062 |" in table and "0.850 / 0.750 / 0.500" in table
    report = ablation.separation_report(results, columns)
    assert "a > b beyond the seeds' spread" in report and "in every seed: a > c" in report


def test_sweep_reads_finished_variants_back_and_stops_on_a_stopped_one(tmp_path, monkeypatch, capsys):
    from grpo_jax import trainer

    base = ablation.load_config("arithmetic_tiny", "runlocal")
    calls = []

    def fake_run(config, workdir, stopped=False):
        calls.append(workdir)
        last = 1 if stopped else config.train.num_steps
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for row in ({"step": 0, "eval/accuracy": 0.0}, {"step": last, "eval/accuracy": 0.5}):
                f.write(json.dumps(row) + "\n")
        return {"stopped_early": stopped, "last_step": last}

    monkeypatch.setattr(trainer, "run", fake_run)
    first = ablation.sweep(base, {"a": {}}, str(tmp_path))
    again = ablation.sweep(base, {"a": {}}, str(tmp_path))
    assert len(calls) == 1 and first == again and "read back" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "run", lambda config, workdir: fake_run(config, workdir, stopped=True))
    with pytest.raises(RuntimeError, match="stopped after step 1"):
        ablation.sweep(base, {"b": {}}, str(tmp_path))
