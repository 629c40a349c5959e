"""The benchmark's PNG: bars per part, the Adam step against the memory roof, and
the scaling curves."""
from __future__ import annotations

from biggan_results import Results


def plot(path: str, res: Results, curves, title: str) -> None:
    """Bars per part with spread and speed-ups, a roofline-style panel (time per
    parameter against bytes per parameter, the measured roof drawn), and the
    scaling curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bar_parts = [p for p in res.data if p.split()[0] in ("adam", "wrapper", "ema", "update+ema")]
    rows = 2 if curves else 1
    fig, grid = plt.subplots(rows, 2, figsize=(15, 6.5 * rows), squeeze=False)
    axes = [a for row in grid for a in row]
    fig.suptitle(title)
    ax = axes[0]
    y, ticks, labels = 0, [], []
    for part in bar_parts:
        for name, e in res.data[part].items():
            ours = e["speedup_of_ours"] is None
            noisy = "noise" in e["note"]
            ms = e["median_s"] * 1e3
            ax.barh(y, ms, xerr=ms * e["spread"], capsize=2, hatch="//" if noisy else None,
                    color="tab:green" if ours else "tab:gray", edgecolor="black", linewidth=0.4)
            if not ours:
                s = e["speedup_of_ours"]
                ax.text(ms * (1 + e["spread"]) * 1.03, y,
                        (f"ours {s:.2f}x faster" if s >= 1 else f"ours {1 / s:.2f}x slower")
                        + (" (noise)" if noisy else ""), va="center", fontsize=7)
            ticks.append(y)
            labels.append(f"{part}: {name}")
            y += 1
        y += 0.6
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
    ax.set_xlabel("ms per call (median, bars: half the inter-quartile range)")
    ax.set_title("optimizer step, wrapper step, EMA")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:green", label="pygan_optim"),
                       plt.Rectangle((0, 0), 1, 1, color="tab:gray", label="native"),
                       plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black",
                                     hatch="//", label="spread > difference")],
              fontsize=7, loc="lower right")

    ax = axes[1]  # roofline-style: what each Adam variant moves against how long it takes
    colors = {"pygan_optim FusedAdam": "tab:green", "torch Adam fused": "tab:orange",
              "torch Adam foreach": "tab:blue", "torch Adam for-loop": "tab:purple"}
    markers = {"adam G": "o", "adam D": "s"}
    for part in (p for p in res.data if p in markers):
        for name, e in res.data[part].items():
            x, t = e["bytes"] / e["numel"], e["median_s"] / e["numel"] * 1e9
            ax.scatter(x, t, s=45, marker=markers[part], color=colors.get(name, "tab:gray"),
                       edgecolor="black", linewidth=0.4, zorder=3, label=f"{part}: {name}")
            ax.annotate(f"{100 * e['roof_fraction']:.0f}%", (x, t), fontsize=7,
                        xytext=(5, -3), textcoords="offset points")
    xs = [16, 100]
    ax.plot(xs, [x / res.roof * 1e9 for x in xs], "k--",
            label=f"memory roof {res.roof / 1e9:.1f} GB/s (the limit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([20, 24, 28, 72], ["20", "24", "28", "72"])
    ax.set_xlim(18, 110)
    ax.minorticks_off()
    ax.set_xlabel("bytes moved per parameter, by design (beta1 = 0):\n"
                  "20-24 ours, 28 torch fused, 72 foreach and for-loop")
    ax.set_ylabel("ns per parameter (median)")
    ax.set_title("Adam step against the memory roof (labels: % of the roof reached)")
    ax.legend(fontsize=7, loc="upper left")

    if curves:
        for ax, axis, xlabel in ((axes[2], "params", "parameters (M)"),
                                 (axes[3], "tensors", "tensors of 1k elements")):
            pts = sorted(curves[axis])
            for name in ("pygan_optim FusedAdam", "torch Adam fused", "torch Adam foreach"):
                ms = [curves[axis][p][name] * 1e3 for p in pts]
                err = [m * curves[axis][p].get("spread", {}).get(name, 0) for m, p in zip(ms, pts)]
                ax.errorbar(pts, ms, yerr=err, marker="o", capsize=2, label=name)
            ax.plot(pts, [curves[axis][p]["floor_s"] * 1e3 for p in pts], "k--",
                    label="roof floor for ours (20-24 B/param)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per step")
            ax.legend(fontsize=7)
            ax.set_title(f"Adam step time vs {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
