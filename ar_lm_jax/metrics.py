"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard, a progress bar.

Only process 0 writes. TensorBoard is optional: without tensorboardX the run
goes on with JSONL alone.

Steps in metrics.jsonl are unique and increasing, for every reader (the notebook, a tail -f,
pandas): rows of one step (the train row and the eval row) are merged into one line, and a run
that resumes from a checkpoint older than the last logged row first drops the rows past it
(the steps are trained again), rewriting the file atomically. TensorBoard gets the same cut
through `purge_step`, so its curves show each step once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep the line parseable
  return v


def _row_step(line: str) -> Optional[int]:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def drop_rows_after(path: Path, step: int) -> int:
  """Removes the rows of metrics.jsonl past `step` (and a torn last line, from a kill in the middle of a write);
  the file is replaced atomically, so a crash here loses nothing. Returns how many lines were dropped."""
  path = Path(path)
  if not path.is_file():
    return 0
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
  keep = []
  for i, line in enumerate(lines):
    s = _row_step(line)
    torn = i == len(lines) - 1 and not line.endswith("\n") and s is None
    if not torn and (s is None or s <= step):
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) == len(lines):
    return 0
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(lines) - len(keep)


class MetricsWriter:
  """Call `start_at(step)` with the step the run starts from (0, or the restored checkpoint's) before writing."""

  def __init__(self, workdir: Path, enabled: bool = True, total_steps: int = 0, progress: bool = True):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._file = None
    self._tb = None
    self._tb_tried = False
    self._purge_step: Optional[int] = None
    self._bar = None
    self._last: Optional[tuple[int, int, dict]] = None  # (step, file offset of its line, row) of the last line written
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, dynamic_ncols=True, file=sys.stderr, unit="step")

  def start_at(self, step: int) -> None:
    """Drops the rows (and TensorBoard events) past `step`: a resume from an older checkpoint trains them again."""
    if self.enabled:
      if self._file is not None:
        self._file.close()
        self._file = None
      dropped = drop_rows_after(self.path, step)
      if dropped:
        print(f"note: dropped {dropped} row(s) past step {step} from {self.path} (the run resumes from step {step})",
              flush=True)
      self._purge_step = step + 1
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def _open(self) -> None:
    if self._file is None:
      self._file = open(self.path, "a", buffering=1, encoding="utf-8")
      self._last = None
    if not self._tb_tried:
      self._tb_tried = True
      try:
        from tensorboardX import SummaryWriter
        # purge_step: TensorBoard drops the events of earlier files at and past it (a resume retrains them).
        # The suffix keeps two starts within one second (same host) from writing the same file name.
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=self._purge_step,
                                 filename_suffix=f".{os.getpid()}.{self._purge_step or 0}")
      except Exception:  # noqa: BLE001 - a missing or broken optional dependency never stops training
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._open()
    step = int(step)
    new = {k: _jsonable(v) for k, v in metrics.items()}
    if self._last is not None and self._last[0] == step:  # a second row of the same step: rewrite its line merged
      _, offset, old = self._last
      row = {**old, **new}
      self._file.truncate(offset)
    else:
      row = {"step": step, **new}
      offset = self._file.tell()
    self._file.write(json.dumps(row) + "\n")
    self._last = (step, offset, row)
    if self._tb is not None:
      for k, v in new.items():
        if isinstance(v, (int, float)):
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
