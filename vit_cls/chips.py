"""Facts about the accelerators `vit_cls.aot` compiles for: memory, bf16 peak, bandwidths. One table.

These are vendor figures, not measurements: the roofline estimate of `vit_cls.aot` divides a compiled
program's FLOPs and bytes by them, so its images/s are an upper bound of what the chip could do, never a
measured speed. Every number says where it comes from.

Units: bytes, FLOP/s, bytes/s. `memory_bytes` is per chip; `devices_per_chip` is how many JAX devices a chip
shows (TPU7x exposes each of its two TensorCores as one device; v4 and v5p run in megacore mode, one
device per chip, as on their Cloud TPU VMs). `interconnect_bytes_per_s` is the chip's inter-chip bandwidth
in one direction (half the bidirectional figure the vendors quote): a ring collective sends and receives
at once, so its time is the bytes one chip sends divided by this. `network_bytes_per_s` is the per-chip
share of the data-centre network a multi-host GPU job crosses between hosts.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
GB = 10**9
T = 10**12


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the prefix of a target name: v5e, h100, ...
  kind: str  # what JAX's device_kind says for it (compile-only devices included)
  platform: str  # tpu | cuda
  memory_bytes: int
  bf16_flops_per_s: float  # dense peak, no sparsity
  hbm_bytes_per_s: float
  interconnect_bytes_per_s: float  # one direction, per chip (TPU ICI; NVLink within a GPU host)
  network_bytes_per_s: float = 0.0  # GPU: per-GPU share of the inter-host network
  devices_per_chip: int = 1
  source: str = ""


# TPU: Google Cloud's TPU pages, "System architecture" tables (docs.cloud.google.com/tpu/docs/<version>,
# read 2026-12). v5e: 197 TFLOPs bf16, 16 GiB HBM at 819 GBps, 400 GBps bidirectional ICI (4 ports).
# v5p, v6e, TPU7x: the comparison table on the tpu7x page: bf16 459 / 918 / 2307 TFLOPs, HBM 95 / 32 /
# 192 GiB at 2765 / 1638 / 7380 GBps, bidirectional ICI 1200 / 800 / 1200 GBps per chip; TPU7x has two
# TensorCores per chip, each one JAX device. v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps (the v4 page);
# its ICI: 6 links of 50 GB/s per direction (Jouppi et al., "TPU v4", ISCA 2023), 300 GB/s one way.
_TPUS = (
    Chip("v4", "TPU v4", "tpu", 32 * GiB, 275 * T, 1200 * GB, 300 * GB,
         source="cloud.google.com/tpu/docs/v4; ICI: Jouppi et al. ISCA 2023"),
    Chip("v5e", "TPU v5 lite", "tpu", 16 * GiB, 197 * T, 819 * GB, 200 * GB,
         source="cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", "tpu", 95 * GiB, 459 * T, 2765 * GB, 600 * GB,
         source="cloud.google.com/tpu/docs/v5p, tpu7x comparison table"),
    Chip("v6e", "TPU v6 lite", "tpu", 32 * GiB, 918 * T, 1638 * GB, 400 * GB,
         source="cloud.google.com/tpu/docs/v6e, tpu7x comparison table"),
    Chip("tpu7x", "TPU7x", "tpu", 192 * GiB, 2307 * T, 7380 * GB, 600 * GB, devices_per_chip=2,
         source="cloud.google.com/tpu/docs/tpu7x"),
)

# GPU: NVIDIA's data sheets, SXM parts, dense bf16 (the sparse figure is twice this). H100 SXM5 80GB:
# 989 TFLOPS, 3.35 TB/s HBM3; H200 SXM 141GB: 989 TFLOPS, 4.8 TB/s HBM3e; A100 SXM4 80GB: 312 TFLOPS,
# 2,039 GB/s HBM2e. NVLink: 900 GB/s bidirectional for H100/H200 (NVLink 4), 600 GB/s for A100
# (NVLink 3). Between hosts: one 400 Gb/s InfiniBand NIC per GPU (the DGX H100/H200 layout; DGX A100:
# one 200 Gb/s HDR NIC per GPU). Memory: what the device reports (and the target descriptions in
# vit_cls/gpu_targets/ hold): 79.1 GiB of an "80 GB" H100, 139.8 GiB of a "141 GB" H200, 79.35 GiB
# of an "80 GB" A100.
_GPUS = (
    Chip("h100", "NVIDIA H100 80GB HBM3", "cuda", 84_929_347_584, 989 * T, 3350 * GB, 450 * GB,
         network_bytes_per_s=50 * GB, source="NVIDIA H100 Tensor Core GPU data sheet (SXM5)"),
    Chip("h200", "NVIDIA H200", "cuda", 150_121_834_905, 989 * T, 4800 * GB, 450 * GB,
         network_bytes_per_s=50 * GB, source="NVIDIA H200 Tensor Core GPU data sheet (SXM)"),
    Chip("a100", "NVIDIA A100-SXM4-80GB", "cuda", 85_201_231_462, 312 * T, 2039 * GB, 300 * GB,
         network_bytes_per_s=25 * GB, source="NVIDIA A100 Tensor Core GPU data sheet (SXM4 80GB)"),
)

CHIPS: dict[str, Chip] = {c.name: c for c in _TPUS + _GPUS}
TPU_NAMES = tuple(c.name for c in _TPUS)
GPU_NAMES = tuple(c.name for c in _GPUS)


def chip(name: str) -> Chip:
  return CHIPS[name]
