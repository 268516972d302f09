"""What a person reads of a sweep: the table of trials (also ``trials.csv``), Optuna's
plots as PNG (optimization history, parameter importances, slice) and the command that
reruns the best trial, all in the sweep's folder."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

PLOTS = {
    "history.png": "plot_optimization_history",
    "importances.png": "plot_param_importances",
    "slice.png": "plot_slice",
}


def rows(study: Any) -> list[dict[str, Any]]:
    return [
        {
            "trial": t.number,
            "state": t.state.name,
            "value": "" if t.value is None else f"{t.value:.6g}",
            **{name: value for name, value in t.params.items()},
            "run_dir": t.user_attrs.get("run_dir", ""),
            "note": t.user_attrs.get("error", ""),
        }
        for t in study.get_trials(deepcopy=False)
    ]


def table(records: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in records for k in r))
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in records)) for c in columns}
    lines = ["  ".join(c.ljust(width[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(width[c]) for c in columns) for r in records]
    return "\n".join(lines)


def report(study: Any, folder: Path) -> None:
    records = rows(study)
    if not records:
        print("sweep: no trial yet")
        return
    print(table(records))
    with open(folder / "trials.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
    plots(study, folder)
    best = best_trial(study)
    if best is not None:
        command = best.user_attrs.get("command", "")
        rerun = command.replace(best.user_attrs.get("run_dir", "\0"), str(folder / "best-rerun"))
        print(f"best: trial {best.number}, value {best.value:.6g}, {best.params}")
        print(f"rerun it: {rerun.removesuffix(' --ckpt_path auto')}")


def best_trial(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:  # no trial completed
        return None


def plots(study: Any, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    for name, function in PLOTS.items():
        with warnings.catch_warnings():  # "experimental": the API, not the figure
            warnings.simplefilter("ignore")
            try:
                axes = getattr(optuna_plots, function)(study)
            except Exception as error:  # noqa: BLE001 - a plot needs enough finished trials
                print(f"sweep: {name} not drawn ({error})")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
