"""Run-directory writers: a JSON-lines metrics file and TensorBoard event files.

TensorBoard events are written with the `tensorboard` package's protos and record writer, so no
TensorFlow is needed (GPU images without it still log). Only process 0 writes.

Each row (`scalars`) goes to both, and a resumed run first cuts both back to the rows its
checkpoint had seen (`MetricWriter.open`), so after any kill and resume every row is in each
exactly once. Each process writes its own event file, `events.out.tfevents.<first row>.<host>`,
the zero-padded number of rows before its first telling where it may be cut.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import struct
import time
from typing import Callable

from etils import epath

log = logging.getLogger("midas_jax")
_EVENTS = "events.out.tfevents."


class MetricWriter:
  """Scalars to `metrics.jsonl` and `tensorboard/`; text (e.g. the gin config) to TensorBoard.

  Nothing is written before `open`. `rows` counts the rows in `metrics.jsonl` (those kept from
  earlier processes included), which a checkpoint records so that a resumed run can `open`
  after exactly those.
  """

  def __init__(self, run_dir, enabled: bool = True):
    self.enabled, self.run_dir = enabled, epath.Path(run_dir)
    self.rows = 0
    self._jsonl = self._tb = self._pb = None

  def open(self, keep_rows: int | None = None, step: int = 0) -> None:
    """Start writing after the first `keep_rows` rows (None: the rows of steps up to `step`, as
    checkpoints that do not record `rows` need); drop the rows after them from both files."""
    if not self.enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    path = self.run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line, row in zip(lines, map(_row, lines)) if row is not None
            and (keep_rows is not None or row["step"] <= step)][:keep_rows]
    if len(kept) != len(lines):
      tmp = self.run_dir / "metrics.jsonl.tmp"
      tmp.write_text("".join(line + "\n" for line in kept))
      tmp.replace(path)  # atomic: a kill now leaves the old rows or the new ones
    self.rows = len(kept)
    self._jsonl = path.open("a")
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2, \
          tensor_shape_pb2  # pylint: disable=import-outside-toplevel
      from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      log.warning("The `tensorboard` package is not installed: no TensorBoard event files "
                  "(pip install tensorboard); metrics.jsonl is still written.")
      return
    self._pb = (event_pb2, summary_pb2, tensor_pb2, types_pb2, tensor_shape_pb2)
    tb = self.run_dir / "tensorboard"
    tb.mkdir(parents=True, exist_ok=True)
    _cut_events(tb, self.rows, event_pb2)
    self._tb = RecordWriter(
        (tb / f"{_EVENTS}{self.rows:012d}.{socket.gethostname()}").open("wb"))
    self._event(0, file_version="brain.Event:2")

  def _event(self, step: int, **fields) -> None:
    self._tb.write(self._pb[0].Event(wall_time=time.time(), step=int(step),
                                     **fields).SerializeToString())

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
             for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
    self.rows += 1
    if self._tb is not None:
      summary_pb2 = self._pb[1]
      vals = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()
              if isinstance(v, float) and not math.isnan(v)]
      self._event(step, summary=summary_pb2.Summary(value=vals))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text summary (TensorBoard's Text tab), e.g. the operative gin config."""
    if not (self.enabled and self._tb is not None):
      return
    _, summary_pb2, tensor_pb2, types_pb2, shape_pb2 = self._pb
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                    tensor_shape=shape_pb2.TensorShapeProto())
    value = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)
    self._event(step, summary=summary_pb2.Summary(value=[value]))

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


def _row(line: str) -> dict | None:
  """A metrics.jsonl line as a row; None for a line cut short by a kill."""
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def _records(f):
  """(offset, data) of each complete TFRecord in the binary file `f` (a torn tail ends it)."""
  while True:
    offset, header = f.tell(), f.read(12)  # uint64 length, uint32 crc of the length
    if len(header) < 12:
      return
    n = struct.unpack("<Q", header[:8])[0]
    data = f.read(n + 4)  # the data, uint32 crc of it
    if len(data) < n + 4:
      return
    yield offset, data[:n]


def _cut_events(tb_dir, keep: int, event_pb2) -> None:
  """Delete or cut this writer's event files to hold the first `keep` rows (files of other
  writers are left alone)."""
  for path in sorted(tb_dir.glob(f"{_EVENTS}*")):
    first = path.name[len(_EVENTS):].split(".")[0]
    if not (len(first) == 12 and first.isdigit()):
      continue
    if int(first) >= keep:
      path.unlink()
      continue
    n, cut = int(first), None
    with path.open("rb") as f:
      for offset, data in _records(f):
        event = event_pb2.Event.FromString(data)
        is_row = event.HasField("summary") and not any(
            v.metadata.plugin_data.plugin_name == "text" for v in event.summary.value)
        if is_row and n == keep:
          cut = offset
          break
        n += is_row
    if cut is not None:
      path.write_bytes(path.read_bytes()[:cut])


def read_rows(run_dir, keep: Callable[[dict], bool] = lambda row: True) -> list[dict]:
  """The rows of a run's `metrics.jsonl` that `keep` accepts, one per step (the last one
  written at a step wins), in step order.

  A line cut short by a kill is skipped; a run without the file has no rows.
  """
  path = epath.Path(run_dir) / "metrics.jsonl"
  rows = {}
  for row in map(_row, path.read_text().splitlines() if path.exists() else []):
    if row is not None and keep(row):
      rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]
