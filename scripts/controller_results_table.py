"""Markdown results table of budget controllers from their `evaluate_controller` runs (issue 15, item 6).

Every run scores its controller and the yardsticks on the same held-out measured runs (same table,
calibration seed and budgets: checked here), so one table holds them all: accuracy / adherence per budget
percent for static full, lookup (overall, per data set), each controller and the oracle; the share of
the oracle each controller reaches; each controller's lead over the per-data-set lookup at 60-90%; and
the knob distributions (does a controller vary top_k and blocks per request, or collapse to one config?).

    python scripts/controller_results_table.py supervised=<run id> stage1=<run id> grpo=<run id> ... > table.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from core.knobs import KNOBS

YARDSTICKS_BEFORE = (("static_full", "static full"), ("lookup", "lookup (overall)"), ("lookup_dataset", "lookup (per data set)"))
SAME_SETUP_PARAMS = ("l_full_ms", "calibration_seed", "budget_percents", "measured_table")
LEAD_PERCENTS = ("60", "70", "80", "90")


def _artifact_csv(client: MlflowClient, run_id: str, path: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(client.download_artifacts(run_id, path, tmp))


def _cell(row: pd.Series) -> str:
    return f"{row['accuracy']:.3f} / {row['adherence']:.3f}"


def results_table(runs: dict[str, str], client: MlflowClient) -> str:
    """The markdown of every section for {label: evaluate_controller run id}."""
    setups, curves, decisions = {}, {}, {}
    for label, run_id in runs.items():
        params = client.get_run(run_id).data.params
        setups[label] = {k: params.get(k) for k in SAME_SETUP_PARAMS}
        curves[label] = _artifact_csv(client, run_id, "evaluation/curves.csv")
        decisions[label] = _artifact_csv(client, run_id, "evaluation/decisions.csv")
    first = next(iter(runs))
    for label, setup in setups.items():
        if setup != setups[first]:
            raise SystemExit(f"run {runs[label]} ({label}) was scored on another setup than {runs[first]}: {setup} vs {setups[first]}")
    yard = curves[first]
    percents = [str(p) for p in yard["percent"].drop_duplicates()]
    rows: list[tuple[str, pd.DataFrame]] = [(name, yard[yard["method"] == method]) for method, name in YARDSTICKS_BEFORE]
    rows += [(label, frame[frame["method"] == "controller"]) for label, frame in curves.items()]
    rows.append(("oracle (bound)", yard[yard["method"] == "oracle"]))
    head = f"| method | {' | '.join(f'{p}%' for p in percents)} |"
    lines = [f"Held-out measured runs: L_full {setups[first]['l_full_ms']} ms, calibration seed "
             f"{setups[first]['calibration_seed']}; each cell accuracy / adherence (share of measured runs with T_total <= B).",
             "", head, "|---" * (len(percents) + 1) + "|"]
    for name, frame in rows:
        by_p = frame.assign(percent=frame["percent"].astype(str)).set_index("percent")
        lines.append(f"| {name} | {' | '.join(_cell(by_p.loc[p]) for p in percents)} |")

    lookup = yard[yard["method"] == "lookup_dataset"].assign(percent=lambda f: f["percent"].astype(str)).set_index("percent")
    lines += ["", f"| controller | oracle share {' / '.join(percents)} | mean lead over per-data-set lookup at "
              f"{'/'.join(LEAD_PERCENTS)}% (points) | budgets >= that lookup (of 60-100%) |", "|---|---|---|---|"]
    for label, frame in curves.items():
        mine = frame[frame["method"] == "controller"].assign(percent=lambda f: f["percent"].astype(str)).set_index("percent")
        share = " / ".join(f"{mine.at[p, 'oracle_share']:.3f}" for p in percents)
        lead = 100 * sum(mine.at[p, "accuracy"] - lookup.at[p, "accuracy"] for p in LEAD_PERCENTS) / len(LEAD_PERCENTS)
        above = [p for p in percents if int(p) >= 60]
        at_or_above = sum(mine.at[p, "accuracy"] >= lookup.at[p, "accuracy"] - 1e-12 for p in above)
        lines.append(f"| {label} | {share} | {lead:+.1f} | {at_or_above} of {len(above)} |")

    lines += ["", "Knob distributions per budget (share of held-out decisions; `configs` = distinct configs chosen):", "",
              "| controller | budget | configs | tier low/medium/high | top_k values | blocks values |", "|---|---|---|---|---|---|"]
    for label, frame in decisions.items():
        mine = frame[frame["method"] == "controller"].drop_duplicates(["sample_id", "fraction"])
        for fraction, part in mine.groupby("fraction", sort=True):
            tiers = part["tier"].value_counts(normalize=True)
            tier_text = "/".join(f"{tiers.get(t, 0.0):.2f}" for t in ("low", "medium", "high"))
            knob_text = [", ".join(f"{int(v)}: {s:.2f}" for v, s in part[k].value_counts(normalize=True).sort_index().items())
                         for k in ("top_k", "num_active_blocks")]
            configs = part[list(KNOBS)].drop_duplicates().shape[0]
            lines.append(f"| {label} | {round(100 * fraction)}% | {configs} | {tier_text} | {knob_text[0]} | {knob_text[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="label=run_id of evaluate_controller runs, in table order")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, run_id = item.partition("=")
        if not sep or not run_id:
            print(f"argument {item!r}: expected label=run_id", file=sys.stderr)
            return 2
        runs[label] = run_id
    sys.stdout.write(results_table(runs, MlflowClient(mlflow.get_tracking_uri())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
