"""Quality against training cost for several runs: one plot (quality vs device-hours and vs images seen) and a
markdown table. The points of a run are its in-training quality rows (stats.jsonl: `fid` from eval.fid_every,
`digits_class_agreement` from eval.agreement_every) and any `eval` metrics files under <run>/eval/ (written with
`python -m maskdit_ds eval ... --out <run>/eval/<name>.json` for samples of the run's exports). Each point
carries the device-hours (training wall time x devices, evaluation excluded) and images seen that reached it.

Runs given as LABEL=DIR share a label: their curves are averaged point by point (the seeds of one arm), with the
spread shown as a band and the table giving mean +- standard deviation over runs.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .. import io

METRICS = {  # stats key -> (axis label, better)
    "fid": ("FID (lower is better)", min),
    "digits_class_agreement": ("digits class agreement (higher is better)", max),
}


@dataclass
class Point:
    step: int
    value: float
    device_hours: float
    images_seen: int


@dataclass
class Arm:
    """The runs of one label (e.g. one configuration over several seeds)."""

    label: str
    runs: dict = field(default_factory=dict)  # run dir -> [Point] in step order


def parse_runs(items: list[str]) -> list[tuple[str, Path]]:
    """["LABEL=DIR" or "DIR", ...] -> [(label, dir)]; a bare DIR is labelled by its folder name."""
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        label, path = (label, path) if sep and not Path(item).exists() else (Path(item).name, item)
        run = Path(path)
        if not (run / "stats.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a run directory (no stats.jsonl)")
        out.append((label, run))
    return out


def read_points(run: Path, metric: str) -> list[Point]:
    """The run's quality points for `metric`, in step order (a later row for the same step wins: a resume)."""
    rows = {}
    for line in (run / "stats.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if row.get(metric) is not None and "device_hours" in row:
            rows[row["step"]] = Point(row["step"], row[metric], row["device_hours"], row.get("images_seen", 0))
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        record = json.loads(path.read_text())
        trained = record.get("training") or {}
        if record.get(metric) is not None and trained.get("device_hours") is not None:
            rows[trained["step"]] = Point(trained["step"], record[metric], trained["device_hours"],
                                          trained.get("images_seen", 0))
    return [rows[step] for step in sorted(rows)]


def pick_metric(runs: list[tuple[str, Path]], metric: str) -> str:
    """`auto`: FID when any run has it, else the digits class agreement."""
    if metric != "auto":
        return metric
    return "fid" if any(read_points(run, "fid") for _, run in runs) else "digits_class_agreement"


def collect(runs: list[tuple[str, Path]], metric: str) -> list[Arm]:
    arms: dict[str, Arm] = {}
    for label, run in runs:
        points = read_points(run, metric)
        if not points:
            raise ValueError(f"{run}: no `{metric}` values with device-hours in stats.jsonl or eval/ (train with "
                             f"eval.{'fid' if metric == 'fid' else 'agreement'}_every > 0)")
        arms.setdefault(label, Arm(label)).runs[str(run)] = points
    return list(arms.values())


def mean_curve(arm: Arm) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Point-by-point over the arm's runs, up to the shortest: (device-hours, images seen, mean, low, high)."""
    curves = list(arm.runs.values())
    n = min(len(c) for c in curves)
    hours = [statistics.mean(c[i].device_hours for c in curves) for i in range(n)]
    images = [statistics.mean(c[i].images_seen for c in curves) for i in range(n)]
    values = [[c[i].value for c in curves] for i in range(n)]
    return hours, images, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4g}" if len(values) < 2 else f"{mean:.4g} +- {statistics.stdev(values):.2g}"


def table(arms: list[Arm], metric: str) -> str:
    """Markdown: per label, the final and best quality (mean +- sd over runs) and the cost of the final point."""
    better = METRICS.get(metric, (metric, max))[1]
    lines = [f"| run | runs | final {metric} | best {metric} | device-hours | images seen | steps |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        finals = [c[-1] for c in arm.runs.values()]
        bests = [better(p.value for p in c) for c in arm.runs.values()]
        lines.append(f"| {arm.label} | {len(finals)} | {spread([p.value for p in finals])} | {spread(bests)} "
                     f"| {spread([p.device_hours for p in finals])} "
                     f"| {statistics.mean(p.images_seen for p in finals):,.0f} "
                     f"| {statistics.mean(p.step for p in finals):,.0f} |")
    return "\n".join(lines)


def plot(arms: list[Arm], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in arms:
        hours, images, mean, low, high = mean_curve(arm)
        label = f"{arm.label} (n={len(arm.runs)})" if len(arm.runs) > 1 else arm.label
        for ax, x in zip(axes, (hours, images)):
            line, = ax.plot(x, mean, marker="o", markersize=3, label=label)
            if len(arm.runs) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    axes[0].set_xlabel("device-hours (training wall time x devices)")
    axes[1].set_xlabel("images seen")
    for ax in axes:
        ax.set_ylabel(METRICS.get(metric, (metric,))[0])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(Path(path), "plot") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def report(items: list[str], out: Path, metric: str = "auto") -> tuple[Path, Path, str]:
    """Write out/report.png and out/report.md; returns their paths and the markdown."""
    runs = parse_runs(items)
    metric = pick_metric(runs, metric)
    arms = collect(runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "report.png", out / "report.md"
    plot(arms, metric, png)
    text = table(arms, metric)
    if any(math.isnan(p.value) for arm in arms for c in arm.runs.values() for p in c):
        text += "\n(some values are NaN: a diverged or broken evaluation)"
    io.atomic_write_text(md, f"{text}\n\n![quality against compute]({png.name})\n")
    return png, md, text
