"""The report's figures, drawn from its rows (no store access): matplotlib on the Agg backend.

No text labels sit beside points (they overlapped on every crowded plot): every method has its own colour
and marker, named once in a legend outside the axes. `retrain` (the floor) is black, do-nothing a
colour of its own, never the floor band's grey.
"""

from __future__ import annotations

import io

import numpy as np

GROUPS = ("forget", "retain", "val")
REFERENCE_ROWS = ("retrain", "do_nothing")

# One colour and marker per method: no two methods share both.
STYLES = {
    "retrain": ("#000000", "*"), "do_nothing": ("#a6761d", "X"), "dm_direct": ("#1f77b4", "o"),
    "dmm": ("#d62728", "s"), "oracle_matching": ("#2ca02c", "D"), "finetune": ("#ff7f0e", "^"),
    "gradient_ascent": ("#9467bd", "v"), "neggrad_plus": ("#8c564b", "<"), "scrub": ("#e377c2", ">"),
    "del": ("#17becf", "p"), "sfron": ("#bcbd22", "h"), "camu": ("#393b79", "P"),
}
_EXTRA = [("#ad494a", "d"), ("#637939", "8"), ("#8c6d31", "H"), ("#7b4173", "1"), ("#3182bd", "2")]
# The ECDF's log axis starts at half the smallest row's 1st percentile, never below this; values under the
# start are drawn at it (a point the two sides bin alike scores 0).
ECDF_LOW = 1e-3


def style(method: str) -> tuple[str, str]:
    if method in STYLES:
        return STYLES[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def draw(forget_set: str | None, rows: list[dict], context: dict) -> list[tuple[str, bytes]]:
    """A forget set's compute and ECDF figures (forget_set None: the forget-vs-retain overview of every
    set), as (file name, PNG bytes). context: "ceiling" (KLoM's largest value), "saturated_at" (the
    saturation threshold) and, per forget set, "corner" ({"retain": x, "forget": x}: the good corner's
    bounds as multiples of the floor, None where unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if forget_set is None:
        return [forget_vs_retain(plt, rows, context)]
    return [compute_plot(plt, forget_set, rows, context), ecdfs(plt, forget_set, rows, context)]


def _png(plt, fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _yerr(v: dict) -> list | None:
    if v["x_low"] is None:
        return None
    return [[max(0.0, v["x"] - v["x_low"])], [max(0.0, v["x_high"] - v["x"])]]


def _multiples_axis(axis) -> None:
    """Readable ticks on a log axis of multiples of the floor: 0.5x, 1x, 2x, 5x, 10x, ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, 100]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    axis.set_minor_formatter(NullFormatter())


def _legend_handles(methods: list[str], extra: list | None = None) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style(m)[0], marker=style(m)[1], ls="none", ms=7,
                      label="retrain (the floor)" if m == "retrain" else m) for m in methods]
    return handles + (extra or [])


def compute_plot(plt, fs: str, sub: list[dict], context: dict) -> tuple[str, bytes]:
    """Forget P95 (x floor, log) against compute (log, fractions of one retraining). Filled: per request;
    hollow: per request plus the amortized one-off cost, so a method that needs 288 retrainings first is
    drawn there too. Methods with no training per request sit on their own strip at the left."""
    from matplotlib.lines import Line2D

    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(8.5, 4.2), sharey=True, gridspec_kw={"width_ratios": [1, 6]})
    floor = next(r for r in sub if r["method"] == "retrain")
    nothing = next((r for r in sub if r["method"] == "do_nothing"), None)
    shown = [r for r in sub if r["vs_floor"]["forget"]["x"] is not None and r["compute"] is not None]
    zero = [r for r in shown if r["compute"] <= 0]
    xf = floor["vs_floor"]["forget"]
    for a in (ax0, ax):
        if xf["x_low"] is not None:
            a.axhspan(xf["x_low"], xf["x_high"], color="0.85", lw=0)
        a.axhline(1.0, color="k", lw=0.8)
        if nothing is not None:
            a.axhline(nothing["vs_floor"]["forget"]["x"], color=style("do_nothing")[0], lw=1, ls="--")
        if floor["klom"]["forget"]["p95"] > 0:
            a.axhline(context["ceiling"] / floor["klom"]["forget"]["p95"], color="#b2182b", lw=0.8, ls=":")
    ys = []
    for r in shown:
        v = r["vs_floor"]["forget"]
        color, marker = style(r["method"])
        a, x = (ax0, zero.index(r)) if r["compute"] <= 0 else (ax, r["compute"])
        a.errorbar([x], [v["x"]], yerr=_yerr(v), color=color, marker=marker, ms=8, capsize=3, ls="none", zorder=3,
                   mec="white", mew=0.6)  # a white rim keeps markers that land together apart
        ys += [v["x"], v["x_high"] or v["x"]]
        if r.get("amortized"):
            total = r["compute"] + r["amortized"]
            ax.plot([total], [v["x"]], ls="none", marker=marker, ms=9, mfc="none", mec=color, mew=1.5, zorder=3)
            if r["compute"] > 0:
                ax.annotate("", (total, v["x"]), (r["compute"], v["x"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8, "ls": ":"})
    ax0.set_xlim(-0.7, max(1, len(zero)) - 0.3)
    ax0.set_xticks([])
    ax0.set_xlabel("no training\nper request", fontsize=8)
    ax0.set_ylabel("forget-set P95 KLoM, multiple of the floor (log)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(0.5, min(ys) * 0.8), max(ys) * 1.4)
    _multiples_axis(ax.yaxis)
    ax.set_xlabel("compute, fraction of one retraining (log)")
    extra = [Line2D([], [], color="0.85", lw=6, label="floor's 95% interval"),
             Line2D([], [], color=style("do_nothing")[0], ls="--", label="do-nothing's P95"),
             Line2D([], [], color="#b2182b", ls=":", label="KLoM's ceiling"),
             Line2D([], [], color="0.3", marker="o", ls="none", label="per request"),
             Line2D([], [], color="0.3", marker="o", mfc="none", ls="none", label="+ amortized one-off cost")]
    ax.legend(handles=_legend_handles([r["method"] for r in shown], extra), loc="upper left",
              bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    ax.set_title(f"{fs}: forget P95 against compute (bars: bootstrap 95% intervals)", fontsize=9)
    return f"pareto_{fs}.png", _png(plt, fig, 110)


def ecdfs(plt, fs: str, sub: list[dict], context: dict) -> tuple[str, bytes]:
    """One panel per group (forget, retain, val) with every method's ECDF of per-point KLoM on a log
    axis; each method's marker sits where its curve crosses 0.95 (its P95). The axis starts near the
    smallest values (see ECDF_LOW) and ends past the ceiling."""
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    top = context["ceiling"] * 1.3
    low = max(ECDF_LOW, min((float(np.percentile(r["per_point"], 1)) for r in sub if r.get("per_point") is not None),
                            default=1.0) / 2)
    for ax, g in zip(axes, GROUPS):
        for r in sub:
            if r.get("per_point") is None:
                continue
            color, marker = style(r["method"])
            v = np.sort(np.clip(r["per_point"][r["_groups"][g]], low, None))
            at = np.unique(np.linspace(0, len(v) - 1, min(len(v), 400)).round().astype(int))
            lw, ls = (2.2, "-") if r["method"] == "retrain" else (1.2, "--" if r["method"] == "do_nothing" else "-")
            ax.step(v[at], (at + 1) / len(v), where="post", color=color, lw=lw, ls=ls)
            ax.plot([max(low, r["klom"][g]["p95"])], [0.95], marker=marker, color=color, ms=6, ls="none")
        ax.axhline(0.95, color="0.75", lw=0.8)
        ax.axvspan(context["saturated_at"], context["ceiling"], color="#fddbc7", lw=0)
        ax.axvline(context["ceiling"], color="#b2182b", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(low, top)
        ax.set_title(f"{g} points", fontsize=9)
        ax.set_xlabel("per-point KLoM (log)")
    axes[0].set_ylabel("fraction of points")
    extra = [Line2D([], [], color="#fddbc7", lw=6, label="saturated (within 10% of the ceiling)")]
    methods = [r["method"] for r in sub if r.get("per_point") is not None]
    fig.legend(handles=_legend_handles(methods, extra), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(7, len(methods) + 1), fontsize=7, frameon=False)
    fig.suptitle(f"{fs}: ECDF of per-point KLoM against the eval oracles", fontsize=10)
    fig.tight_layout()
    return f"klom_ecdf_{fs}.png", _png(plt, fig, 100)


def forget_vs_retain(plt, rows: list[dict], context: dict) -> tuple[str, bytes]:
    """Per forget set, forget P95 against retain P95 (both x floor, log, with bootstrap intervals); the
    good corner (forget P95 below do-nothing's interval, retain P95 within the bar) shaded green. A method
    that forgets by breaking the model sits far right."""
    from matplotlib.lines import Line2D

    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.8 * len(sets), 3.9), squeeze=False)
    methods: list[str] = []
    for ax, fs in zip(axes[0], sets):
        sub = [r for r in rows if r["forget_set"] == fs
               and r["vs_floor"]["forget"]["x"] is not None and r["vs_floor"]["retain"]["x"] is not None]
        xs, ys = [0.8], [0.8]
        for r in sub:
            vf, vr = r["vs_floor"]["forget"], r["vs_floor"]["retain"]
            color, marker = style(r["method"])
            ax.errorbar([vr["x"]], [vf["x"]], xerr=_yerr(vr), yerr=_yerr(vf), color=color, marker=marker, ms=7,
                        capsize=2, ls="none", lw=0.9, zorder=3, mec="white", mew=0.6)
            xs += [vr["x_high"] or vr["x"]]
            ys += [vf["x_high"] or vf["x"]]
            if r["method"] not in methods:
                methods.append(r["method"])
        corner = context["corner"].get(fs) or {}
        if corner.get("retain") and corner.get("forget"):
            ax.fill_between([0.1, corner["retain"]], 0.1, corner["forget"], color="#d9f0d3", lw=0, zorder=0)
            ax.text(0.03, 0.03, "good corner", fontsize=7, color="#1b7837", transform=ax.transAxes)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axvline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(0.5, max(xs) * 1.5)
        ax.set_ylim(0.5, max(ys) * 1.5)
        _multiples_axis(ax.xaxis)
        _multiples_axis(ax.yaxis)
        ax.set_xlabel("retain P95 / floor (log)")
        ax.set_title(fs, fontsize=9)
    axes[0][0].set_ylabel("forget P95 / floor (log)")
    extra = [Line2D([], [], color="#d9f0d3", lw=6, label="good corner: forgets, keeps retain")]
    fig.legend(handles=_legend_handles(methods, extra), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(7, len(methods) + 1), fontsize=7, frameon=False)
    fig.suptitle("forget vs retain P95 KLoM, multiples of the floor (1 = retraining); bars: bootstrap 95% intervals",
                 fontsize=9)
    fig.tight_layout()
    return "forget_vs_retain.png", _png(plt, fig, 100)
