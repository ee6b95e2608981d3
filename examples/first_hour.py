"""A first hour with oracle-farm: open a finished store and draw two figures from the public API.

    python examples/first_hour.py configs/digits.yaml [--set key=value ...] [--out first-hour]

1. Figure 1 of the DMM paper, per forget set: each method's forget-set KLoM (P95 as a multiple of the
   oracle floor, with its bootstrap interval) against its compute as a fraction of one retraining, read
   from the report the `report` stage wrote (`oracle-farm run` or `oracle-farm report` first).
2. A top-k attribution panel: for one validation point, the training points whose inclusion raises and
   lowers its margin most (the per-margin datamodel `theta[:, target]`), drawn as images.

The same steps, cell by cell, are `examples/first_hour.ipynb`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.plan import Plan  # noqa: E402
from pipeline.stages.query import open_attribution  # noqa: E402
from pipeline.store import Store  # noqa: E402


def load_report(config: str, overrides: list[str]) -> dict:
    """The report.json of a config's finished run, from its store."""
    cfg = load_config(config, overrides)
    return Store(cfg.store).read_json(f"reports/{cfg.name}/report.json")


def figure_one(report: dict, out: Path) -> Path:
    """Forget-set KLoM (multiple of the floor) against compute (fraction of a retraining), one panel per set."""
    rows = [r for r in report["rows"] if not r.get("optimistic")]
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for ax, name in zip(axes[0], sets):
        for r in (r for r in rows if r["forget_set"] == name):
            x, f = max(r["compute"], 1e-3), r["vs_floor"]["forget"]
            ax.errorbar(x, f["x"], yerr=[[f["x"] - f["x_low"]], [f["x_high"] - f["x"]]], fmt="o",
                        color=colors[r["method"]], label=r["method"], capsize=2)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")  # the oracle floor
        ax.set(xscale="log", yscale="log", title=name, xlabel="compute (fraction of one retraining)")
    axes[0][0].set_ylabel("forget KLoM P95 (x floor)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = out / "figure1.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def top_k_panel(config: str, overrides: list[str], out: Path, target: int | None = None, k: int = 5) -> Path:
    """The k training points that raise and the k that lower one validation point's margin most."""
    am = open_attribution(config, overrides)
    target = am.n_train if target is None else target  # the first validation point
    top = am.top_k(target=target, k=k)
    cfg = load_config(config, overrides)
    images = Plan(cfg, Store(cfg.store)).train_images()
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6), squeeze=False)
    for row, (side, points) in enumerate((("raise", top["positive"]), ("lower", top["negative"]))):
        for ax, p in zip(axes[row], points):
            ax.imshow(np.asarray(images[p.index]).transpose(1, 2, 0).squeeze(), cmap="gray")
            ax.set_title(f"#{p.index} y={p.label}\n{p.value:+.3f}", fontsize=7)
            ax.axis("off")
        axes[row][0].text(-0.3, 0.5, side, transform=axes[row][0].transAxes, rotation=90, va="center")
    fig.suptitle(f"training points that move target {target}'s margin most", fontsize=9)
    path = out / "top_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="first-hour")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [figure_one(load_report(args.config, args.overrides), out),
             top_k_panel(args.config, args.overrides, out)]
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
