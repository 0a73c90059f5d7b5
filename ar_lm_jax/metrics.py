"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard, a progress bar.

Only process 0 writes. TensorBoard is optional: without tensorboardX the run
goes on with JSONL alone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep the line parseable
  return v


class MetricsWriter:

  def __init__(self, workdir: Path, enabled: bool = True, total_steps: int = 0, progress: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self._file = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
    except Exception:  # noqa: BLE001 - a missing or broken optional dependency never stops training
      self._tb = None
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, dynamic_ncols=True, file=sys.stderr, unit="step")

  def start_at(self, step: int) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def progress(self, step: int, loss: Optional[float] = None, tokens_per_sec: Optional[float] = None) -> None:
    if self._bar is None:
      return
    self._bar.n = step
    post = {}
    if loss is not None:
      post["loss"] = f"{loss:.4f}"
    if tokens_per_sec is not None:
      post["tok/s"] = f"{tokens_per_sec:,.0f}"
    self._bar.set_postfix(post, refresh=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()
