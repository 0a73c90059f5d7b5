"""Plots a config's learning-rate schedule over the whole run, phase boundaries marked.

  python -m tools.plot_schedule --config=ar_stablelm_2_1_6b [--out=lr.png] \
      [--print_steps=0,10000,300000,500000] [--config.optim.KEY=VALUE ...]

With --print_steps the last line printed is a JSON object {"STEP": lr, ...}; without --out
nothing is plotted (one of the two is needed).
Exit codes: 0 ok, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ar_lm_jax import cli, optim  # noqa: E402

GRID_POINTS = 4000  # evaluation points across the run, plus every phase boundary


def parse_steps(text: str) -> list[int]:
  steps = cli.parse_int_list(text, "--print_steps")
  if not steps or any(not 0 <= s < 2**31 for s in steps):
    raise cli.UsageError(f"--print_steps: expected comma-separated steps in [0, 2^31), got {text!r}")
  return steps


def step_label(x: float, total_steps: int) -> str:
  """An x-axis tick: whole steps below 10k-step runs (`25`, not `0.025k`), thousands above (`250k`)."""
  if total_steps < 10_000 or not x:
    return f"{int(round(x)):,}"
  return f"{x / 1000:g}k"


def out_path(text: str, name: str) -> Path:
  """The image --out names: a directory gets `<name>-lr.png` in it, a name without an extension `.png`;
  an extension matplotlib cannot write is bad input."""
  out = Path(text)
  if out.is_dir():
    return out / f"{name}-lr.png"
  if not out.suffix:
    return out.with_name(out.name + ".png")
  supported = plt.figure().canvas.get_supported_filetypes()
  plt.close("all")
  if out.suffix[1:].lower() not in supported:
    raise cli.UsageError(f"--out: cannot write a .{out.suffix[1:]} image (supported: {', '.join(sorted(supported))})")
  return out


def plot(name: str, schedule, boundaries, total_steps: int, out: Path) -> None:
  edges = [b for (_, start, end) in boundaries for b in (start, end)]
  grid = np.unique(np.concatenate([np.linspace(0, max(total_steps, 1), GRID_POINTS).round(), edges,
                                   np.maximum(np.array(edges) - 1, 0)]).astype(np.int64))
  lr = np.asarray(schedule(jnp.asarray(grid)))
  fig, ax = plt.subplots(figsize=(10, 4.5))
  ax.plot(grid, lr, color="tab:blue", lw=1.5)
  top = float(lr.max()) if lr.size and lr.max() > 0 else 1.0
  # Each phase is a shaded band named in the legend, so even a short warmup stays readable.
  colors = plt.get_cmap("Pastel1").colors
  for i, (kind, start, end) in enumerate(boundaries):
    ax.axvline(start, color="gray", ls="--", lw=0.8)
    if end > start:
      ax.axvspan(start, end, color=colors[i % len(colors)], alpha=0.6, lw=0,
                 label=f"{kind}: {start:,} .. {end:,}, lr {float(schedule(start)):.3g} -> {float(schedule(end)):.3g}")
  if boundaries:
    ax.axvline(boundaries[-1][2], color="gray", ls="--", lw=0.8)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
  ax.set_xlim(0, max(total_steps, 1))
  ax.set_ylim(0, top * 1.05)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=10, integer=True))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: step_label(x, total_steps)))
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.set_title(f"{name}: lr schedule over {total_steps:,} steps")
  ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = cli.make_parser(__doc__.splitlines()[0], default_config="ar_stablelm_2_1_6b")
  parser.add_argument("--out", default=None, help="the image to write (.png, .svg, .pdf, ...; a directory: NAME-lr.png in it); optional with --print_steps")
  parser.add_argument("--print_steps", default=None, help="comma-separated steps; prints {step: lr} as JSON last")
  cfg, args = cli.parse_args(parser, argv)
  steps = parse_steps(args.print_steps) if args.print_steps is not None else None
  if args.out is None and steps is None:
    raise cli.UsageError("give --out=FILE.png to plot, --print_steps=S,... to print, or both")
  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import epochs  # train.epochs: the schedule's length is counted from the data
  cfg, plan = epochs.resolve(cfg)
  if plan is not None:
    print(plan.describe(cfg))
  total = cfg.train.steps
  schedule = optim.build_schedule(cfg.optim, total)  # ConfigError if the phases do not fit
  boundaries = optim.phase_boundaries(cfg.optim, total)

  out = out_path(args.out, cfg.name) if args.out is not None else None
  try:
    if out is not None:
      out.parent.mkdir(parents=True, exist_ok=True)
      plot(cfg.name, schedule, boundaries, total, out)
  except OSError as e:
    raise cli.UsageError(f"--out: cannot write {out}: {e.strerror or e}") from None
  for kind, start, end in boundaries:
    print(f"{kind:>14}  steps {start:>9,} .. {end:>9,}  lr {float(schedule(start)):.4g} -> {float(schedule(end)):.4g}")
  if out is not None:
    print(f"wrote {out}")
  if steps is not None:
    values = np.asarray(schedule(jnp.asarray(steps, jnp.int32)))
    print(json.dumps({str(s): float(v) for s, v in zip(steps, values)}))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
