"""Results of `loom eval`: results.json, heatmap.png, loss_by_position.png and a text summary.

results.json (written by run_suite, plus checkpoint/step/recipe):
    train_length, lengths, n, depths
    tasks[task][filler][length] = {teacher_forced, generated, examples} or {skipped}
    grids[passkey|niah_single] = {depths, lengths, teacher_forced[d][l], generated[d][l]}
    loss_by_position[length] = {start, end, loss (per bucket), mean}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def write_json(res: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def plot_heatmaps(res: dict, path: Path) -> None:
    """One panel per grid (passkey, niah_single): depth (rows) x length (columns),
    teacher-forced accuracy; columns past the training length are marked."""
    grids = res["grids"]
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(4.8 * len(grids), 3.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items()):
        data = [[float("nan") if v is None else v for v in row] for row in g["teacher_forced"]]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]])
        ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name} (teacher-forced)")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=8)
        beyond = [j for j, n in enumerate(g["lengths"]) if n > res["train_length"]]
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="black", lw=1.5, ls="--")
    fig.subplots_adjust(wspace=0.35)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"training length {res['train_length']} (dashed: beyond it)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss_by_position(res: dict, path: Path) -> None:
    """Validation loss by position at each evaluated length, training length marked."""
    curves = res["loss_by_position"]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for length, c in sorted(curves.items(), key=lambda kv: int(kv[0])):
        mids = [(a + b) / 2 for a, b in zip(c["start"], c["end"])]
        ax.plot(mids, c["loss"], marker=".", label=f"T={length}")
    ax.axvline(res["train_length"], color="black", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the context (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("validation loss by position")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_lines(res: dict) -> list[str]:
    """A compact text table: one line per task/filler, one column per length."""
    lengths = [str(n) for n in res["lengths"]]
    gen = any("generated" in c for f in res["tasks"].values() for cells in f.values() for c in cells.values())
    head = f"{'task':<24}" + "".join(f"{n:>14}" for n in lengths)
    lines = [head + ("   (teacher-forced / generated)" if gen else "   (teacher-forced)")]
    for name, by_filler in res["tasks"].items():
        for filler, cells in by_filler.items():
            row = f"{name + ('' if filler == 'repeat' else ' [' + filler + ']'):<24}"
            for n in lengths:
                c = cells.get(n, {})
                if "teacher_forced" not in c:
                    row += f"{'-':>14}"
                else:
                    v = f"{c['teacher_forced']:.0%}" + (f" / {c['generated']:.0%}" if "generated" in c else "")
                    row += f"{v:>14}"
            lines.append(row)
    for length, c in sorted(res["loss_by_position"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"val loss @{length}: {c['mean']:.4f} (first bucket {c['loss'][0]:.3f}, "
                     f"last {c['loss'][-1]:.3f})")
    return lines
