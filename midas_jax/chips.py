"""Accelerator datasheets and TPU slice names: what a chip holds and computes, and which slice a
gcloud accelerator type (`v5p-256`) or topology (`v5p:4x4x8`) names.

The figures are the vendors' published ones, per chip (per device for GPUs), dense (no
sparsity). They feed estimates (MFU, a roofline step time, whether a program fits), never
measurements.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: `hbm_bytes` of memory, peak matmul FLOP/s in bf16 and float32 (None where
  the datasheet gives none), and for TPUs the bidirectional ICI bandwidth per chip in bytes/s."""
  name: str
  hbm_bytes: float | None
  bf16_flops: float | None
  f32_flops: float | None = None
  ici_bytes_per_s: float | None = None


# Keyed by a lower-case substring of `device.device_kind`; first match wins ("TPU v5 lite" is
# v5e, "TPU v5" v5p, "TPU v6 lite" v6e; "NVIDIA H100 80GB HBM3" is the SXM part).
# TPUs, from the Cloud TPU "TPU versions" pages (docs.cloud.google.com/tpu/docs/v4, v5e, v5p,
# v6e): v4 275 TFLOP/s, 32 GiB; v5e 197, 16 GB, ICI 400 GB/s; v5p 459, 95 GiB, ICI 1200 GB/s;
# v6e 918, 32 GB, ICI 800 GB/s. The v4 page gives no per-chip ICI figure: 537 GB/s is twice its
# all-reduce bandwidth per pod (1.1 PB/s) over 4096 chips, the ratio v5e's figures have.
# GPUs: NVIDIA's datasheets quote tensor-core rates with 2:4 sparsity; halved here. H100
# SXM/PCIe/NVL: BF16 1979/1513/1671, TF32 989/756/835 sparse; H200 (SXM) as H100 SXM with 141 GB,
# H200 NVL as H100 NVL; A100: BF16 312, TF32 156 dense. float32 is the TF32 rate: what float32
# matmuls use on these GPUs at JAX's default precision.
CHIPS = (
    Chip("tpu v4 lite", None, None),
    Chip("tpu v4", 32 * GiB, 275e12, ici_bytes_per_s=537e9),
    Chip("tpu v5 lite", 16e9, 197e12, ici_bytes_per_s=400e9),
    Chip("tpu v5e", 16e9, 197e12, ici_bytes_per_s=400e9),
    Chip("tpu v5", 95 * GiB, 459e12, ici_bytes_per_s=1200e9),
    Chip("tpu v6 lite", 32e9, 918e12, ici_bytes_per_s=800e9),
    Chip("tpu v6e", 32e9, 918e12, ici_bytes_per_s=800e9),
    Chip("h100 nvl", 94e9, 835e12, 418e12), Chip("h200 nvl", 141e9, 835e12, 418e12),
    Chip("h100 pcie", 80e9, 756e12, 378e12), Chip("h100", 80e9, 989e12, 494e12),
    Chip("h200", 141e9, 989e12, 494e12), Chip("a100", 80e9, 312e12, 156e12),
)


def chip(device_kind: str) -> Chip | None:
  """The datasheet entry of a `device.device_kind`, or None if unknown."""
  kind = device_kind.lower()
  return next((c for c in CHIPS if c.name in kind), None)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense datasheet peak FLOP/s of one device for matmuls in `dtype`, or None if unknown."""
  c = chip(device_kind)
  return None if c is None else (c.bf16_flops if dtype == "bfloat16" else c.f32_flops)


# -- TPU slices ---------------------------------------------------------------------------------

# gcloud's default shape for each slice size, in chips (cube-shaped where it can be). v4 and
# v5p accelerator types count TensorCores (two per chip), v5e (`v5litepod`) and v6e count chips.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_GENERATIONS = {"v4": ("v4", 2, _SHAPES_3D), "v5p": ("v5p", 2, _SHAPES_3D),
                "v5litepod": ("v5e", 1, _SHAPES_2D), "v5e": ("v5e", 1, _SHAPES_2D),
                "v6e": ("v6e", 1, _SHAPES_2D)}


def topology_name(name: str) -> str:
  """`v5p:4x4x8` for `v5p:4x4x8` or the gcloud accelerator type `v5p-256`; ValueError else."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
  if m:
    dims = m.group(2).split("x")
    if len(dims) != (3 if m.group(1) in ("v4", "v5p") else 2):
      raise ValueError(f"Topology {name!r}: {m.group(1)} slices are "
                       f"{'3' if m.group(1) in ('v4', 'v5p') else '2'}-D, e.g. "
                       f"{m.group(1)}:{'4x4x8' if m.group(1) in ('v4', 'v5p') else '4x4'}.")
    return name
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"Unknown TPU slice {name!r}: give a topology such as v5p:4x4x8, v5e:16x16, "
                     "v4:2x2x2, v6e:8x8 or a gcloud accelerator type such as v5p-256, "
                     "v5litepod-16, v4-32, v6e-64.")
  gen, per_chip, shapes = _GENERATIONS[m.group(1)]
  chips_n = int(m.group(2)) // per_chip
  if int(m.group(2)) % per_chip or chips_n not in shapes:
    sizes = ", ".join(f"{m.group(1)}-{n * per_chip}" for n in shapes)
    raise ValueError(f"No {m.group(1)} slice of {m.group(2)} "
                     f"{'TensorCores' if per_chip == 2 else 'chips'}; known sizes: {sizes}. Or "
                     f"give the topology itself, e.g. {gen}:{shapes[max(shapes)]}.")
  return f"{gen}:{shapes[chips_n]}"


def accelerator_type(topology: str) -> str:
  """The gcloud accelerator type of a topology: `v5p:4x4x8` -> `v5p-256`."""
  gen, dims = topology_name(topology).split(":")
  chips_n = math.prod(int(d) for d in dims.split("x"))
  return {"v4": f"v4-{2 * chips_n}", "v5p": f"v5p-{2 * chips_n}",
          "v5e": f"v5litepod-{chips_n}", "v6e": f"v6e-{chips_n}"}[gen]


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `topology` (needs libtpu, no TPU)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  name = topology_name(topology)
  # Compiling needs no TPU, so neither the metadata server nor libtpu's one-process lock (held
  # by any JAX process on this host that initialised libtpu, e.g. a CPU training run).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 and v5p chips have two TensorCores; "megacore" makes each chip one device, as on a TPU VM.
  kwargs = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        num_slices=num_slices, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Cannot describe TPU slice {name} x {num_slices} ({e}); is libtpu "
                     "installed? pip install -e '.[tpu]'") from e
  return list(desc.devices)
