"""Run-directory writers: a JSON-lines metrics file and TensorBoard event files.

TensorBoard events are written with the `tensorboard` package's own event writer and protos, so
no TensorFlow is needed (GPU images without it still log). Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Callable

from etils import epath

log = logging.getLogger("midas_jax")


class MetricWriter:
  """Scalars to `metrics.jsonl` and `tensorboard/`; text (e.g. the gin config) to TensorBoard."""

  def __init__(self, run_dir, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    run_dir = epath.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = (run_dir / "metrics.jsonl").open("a")  # appends when a run resumes
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2, \
          tensor_shape_pb2  # pylint: disable=import-outside-toplevel
      from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=import-outside-toplevel
      self._pb = (event_pb2, summary_pb2, tensor_pb2, types_pb2, tensor_shape_pb2)
      self._tb = EventFileWriter(str(run_dir / "tensorboard"))
    except ImportError:
      log.warning("The `tensorboard` package is not installed: no TensorBoard event files "
                  "(pip install tensorboard); metrics.jsonl is still written.")

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
             for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
    if self._tb is not None:
      event_pb2, summary_pb2 = self._pb[:2]
      vals = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()
              if isinstance(v, float) and not math.isnan(v)]
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=vals)))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text summary (TensorBoard's Text tab), e.g. the operative gin config."""
    if not (self.enabled and self._tb is not None):
      return
    event_pb2, summary_pb2, tensor_pb2, types_pb2, shape_pb2 = self._pb
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                    tensor_shape=shape_pb2.TensorShapeProto())
    value = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary_pb2.Summary(value=[value])))

  def flush(self) -> None:
    if self._jsonl:
      self._jsonl.flush()
    if self._tb:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def read_rows(run_dir, keep: Callable[[dict], bool] = lambda row: True) -> list[dict]:
  """The rows of a run's `metrics.jsonl` that `keep` accepts, one per step (the last written
  wins: a resumed run rewrites the steps after its checkpoint), in step order.

  A line cut short by a kill is skipped; a run without the file has no rows.
  """
  path = epath.Path(run_dir) / "metrics.jsonl"
  rows = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if keep(row):
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]
