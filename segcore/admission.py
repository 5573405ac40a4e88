"""Will a training job fit in memory? An estimate from architecture x batch x crop (or tile) size,
checked before an attempt starts, so that no job is found too big by killing a node.

Per training process:

    runtime + parameters x STATE_BYTES_PER_PARAMETER + pixels x activation bytes per pixel

* ``runtime``: torch and transformers loaded, before any model (CPU resident memory; on CUDA the
  device context instead).
* State: weights, gradients and AdamW's two moments (16 bytes per parameter), the best epoch's
  weights (4) and the copies a checkpoint makes while it is written (20).
* Activations: forward and backward of one optimisation step, for the process's share of the
  batch at the training size (the crop, or the whole tile). Validation runs in windows of the
  crop size (segcore.training), so it needs no more.

The per-architecture figures (segcore.catalogue) were measured on CPU in float32 (peak resident memory of forward,
backward and an AdamW step at 128² and 256², batch 2; the difference per pixel) and are used with
a 20 % margin; on CUDA bf16 autocast holds activations at about 0.6 of that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from segcore.catalogue import CATALOGUE

_MB = 2**20

RUNTIME_BYTES = {"cpu": 800 * _MB, "cuda": 600 * _MB}
STATE_BYTES_PER_PARAMETER = 40
ACTIVATION_FACTOR = {"cpu": 1.2, "cuda": 0.6 * 1.2}
# More than any machine has: refused even when no node has said what it offers.
ABSOLUTE_LIMIT_BYTES = 2 * 2**40


@dataclass(frozen=True)
class MemoryEstimate:
    per_process: int  # bytes
    tiles_per_process: int
    side: int  # of the tiles at the training size

    def describe(self) -> str:
        return (f"about {self.per_process / 2**30:.1f} GB per training process "
                f"({self.tiles_per_process} tile(s) of {self.side}x{self.side} per step)")


@dataclass(frozen=True)
class JobShape:
    """What decides a job's memory: its architecture, batch, crop, the pipeline's tile size, and
    how many processes on how many nodes share each batch."""

    architecture: str
    batch_size: int
    crop_size: int | None
    tile_size: int
    processes: int = 1
    nodes: int = 1

    def need(self, device: str = "cpu") -> MemoryEstimate:
        """The memory each process needs; `device` "cpu" or "cuda..."."""
        facts = CATALOGUE[self.architecture]
        parameters, per_pixel = facts.parameter_count, facts.activation_bytes_per_pixel
        kind = "cuda" if device.startswith("cuda") else "cpu"
        side = min(self.crop_size, self.tile_size) if self.crop_size else self.tile_size
        tiles = -(-self.batch_size // (self.processes * self.nodes))
        activations = tiles * side * side * per_pixel * ACTIVATION_FACTOR[kind]
        total = RUNTIME_BYTES[kind] + parameters * STATE_BYTES_PER_PARAMETER + int(activations)
        return MemoryEstimate(per_process=total, tiles_per_process=tiles, side=side)

    def on_node(self, device: str) -> int:
        """Bytes the job needs of what a node offers one job: one GPU's worth on CUDA (each process
        has its own), all of its processes' on CPU (they share the host)."""
        return self.need(device).per_process * (1 if device.startswith("cuda") else self.processes)

    def refusal(self, offered: int | None, device: str = "cpu") -> tuple[str, str] | None:
        """None when the job fits a node offering `offered` bytes (None: a node that did not say,
        judged only against ABSOLUTE_LIMIT_BYTES); else the parameter to change and why."""
        limit = offered if offered else ABSOLUTE_LIMIT_BYTES
        needed = self.on_node(device)
        if needed <= limit:
            return None
        where = "a GPU" if device.startswith("cuda") else f"{self.processes} process(es) on one node"
        offer = f"the largest trainer node offers {limit / 2**30:.1f} GB" if offered else "more than any machine has"
        why = f"the job needs {self.need(device).describe()}: {needed / 2**30:.1f} GB for {where}; {offer}"
        world = self.processes * self.nodes
        if replace(self, batch_size=world).on_node(device) <= limit:
            return "batch_size", f"{why}: lower the batch size (or set a smaller crop size)"
        if replace(self, batch_size=world, crop_size=min(256, self.tile_size)).on_node(device) <= limit:
            return "crop_size", f"{why}: set a smaller crop size"
        return "architecture", f"{why}: pick a smaller architecture"

