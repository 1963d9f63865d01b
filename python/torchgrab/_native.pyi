"""Typed stub of the Rust extension module (src/python.rs)."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class GraBError(ValueError):
    """Base class of every error torchgrab raises."""

class ShapeError(GraBError):
    """Gradients or indices of the wrong shape or row count."""

class NonFiniteGradientError(GraBError):
    """A gradient holds NaN or Inf; the step was refused."""

class UnitIndexError(GraBError):
    """Indices out of range, repeated, or already balanced this epoch."""

class CallOrderError(GraBError):
    """A call that does not fit the sampler's lifecycle."""

class StateDictError(GraBError):
    """A configuration or state dict that does not fit this sampler."""

class MemoryLimitError(GraBError):
    """A request that would need more memory than is available."""

class UnsupportedInputError(GraBError):
    """A gradient dtype, device or memory layout torchgrab does not take."""

class NativeSampler:
    def __init__(
        self,
        ordering: str,
        n: int,
        seed: int,
        first_epoch_random: bool = True,
        random_signs: bool = False,
        delta: float = 0.1,
        state_dtype: str = "float32",
        fixed_order: Optional[npt.NDArray[np.uint32]] = None,
        depth: int = 5,
        rounds: int = 1,
        projection: Optional[Tuple[str, int]] = None,
        max_memory: Optional[int] = None,
    ) -> None: ...
    def begin_epoch(self, epoch: int) -> npt.NDArray[np.uint32]: ...
    def step(self, segments: Sequence[np.ndarray], dtype: str, indices: npt.NDArray[np.uint32]) -> None: ...
    def step_start(self, segments: Sequence[np.ndarray], dtype: str, indices: npt.NDArray[np.uint32]) -> None: ...
    def step_outer(
        self,
        factors: npt.NDArray[np.float32],
        p: int,
        bias: bool,
        indices: npt.NDArray[np.uint32],
        background: bool = False,
    ) -> None: ...
    def wait_step(self) -> None: ...
    @property
    def busy(self) -> bool: ...
    def step_gram(
        self,
        indices: npt.NDArray[np.uint32],
        u: npt.NDArray[np.float64],
        gram: npt.NDArray[np.float64],
        dim: int,
        also_fresh: npt.NDArray[np.uint32],
    ) -> npt.NDArray[np.float64]: ...
    def current_order(self) -> npt.NDArray[np.uint32]: ...
    @property
    def epochs_begun(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def dim(self) -> Optional[int]: ...
    @property
    def ordering(self) -> str: ...
    @property
    def n(self) -> int: ...
    def state_bytes(self) -> int: ...
    @property
    def mutations(self) -> int: ...
    def state(self) -> Dict[str, Any]: ...
    @staticmethod
    def from_state(state: Dict[str, Any]) -> "NativeSampler": ...

def orderings() -> List[str]: ...
def herding_discrepancy(vectors: npt.NDArray[np.float64], order: npt.NDArray[np.uint32]) -> Tuple[float, float]: ...
def sign_scan(u: npt.NDArray[np.float64], gram: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...

class NativeCoordinated:
    """The replicated CD-GraB order server of one rank (issue 7); see torchgrab.distributed."""

    def __init__(self, world: int, rank: int, shard_len: int) -> None: ...
    def begin_epoch(self) -> npt.NDArray[np.uint32]: ...
    def shard_order(self, w: int) -> npt.NDArray[np.uint32]: ...
    def pair_count(self, rows: int) -> int: ...
    def local_diffs(self, segments: Sequence[np.ndarray], dtype: str) -> npt.NDArray[np.float64]: ...
    def step_exact(self, segments: Sequence[np.ndarray], dtype: str, gathered: npt.NDArray[np.float64]) -> None: ...
    def local_stats(self, segments: Sequence[np.ndarray], dtype: str) -> npt.NDArray[np.float64]: ...
    def decide(
        self, segments: Sequence[np.ndarray], dtype: str, gathered: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]: ...
    def validate(self, segments: Sequence[np.ndarray], dtype: str) -> None: ...
    def own_round(self, segments: Sequence[np.ndarray], dtype: str) -> npt.NDArray[np.float64]: ...
    def place_step(self, segments: Sequence[np.ndarray], dtype: str, signs: npt.NDArray[np.float64]) -> None: ...
    def restore_running_sum(self, s: npt.NDArray[np.float64]) -> None: ...
    def add_sum(self, total: npt.NDArray[np.float64]) -> None: ...
    def replica_bytes(self) -> bytes: ...
    def to_bytes(self) -> bytes: ...
    def load_bytes(self, data: bytes) -> None: ...
    def running_sum(self) -> npt.NDArray[np.float64]: ...
    @property
    def cursor(self) -> int: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def dim(self) -> Optional[int]: ...
    @property
    def epochs_begun(self) -> int: ...

def count_sketch(
    x: npt.NDArray[np.float32],
    order: npt.NDArray[np.uint32],
    starts: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
def outer_rows(
    g: npt.NDArray[np.float32],
    a: npt.NDArray[np.float32],
    scale: float,
    bias: bool,
    accumulate: bool,
    out: npt.NDArray[np.float32],
) -> bool: ...
def count_outer_rows(
    g: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    order: npt.NDArray[np.uint32],
    starts: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.float32],
    scale: float,
    bias: bool,
    accumulate: bool,
    out: npt.NDArray[np.float32],
) -> bool: ...
def count_factors(
    g: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    order: npt.NDArray[np.uint32],
    starts: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.float32],
    scale: float,
    out: npt.NDArray[np.float32],
) -> bool: ...
def outer_factors(
    g: npt.NDArray[np.float32], a: npt.NDArray[np.float32], scale: float, out: npt.NDArray[np.float32]
) -> bool: ...
def expand_outer(factors: npt.NDArray[np.float32], p: int, bias: bool) -> npt.NDArray[np.float32]: ...
def channel_sums(g: npt.NDArray[np.float32], scale: float, accumulate: bool, out: npt.NDArray[np.float32]) -> bool: ...
def norm_sums(
    x: npt.NDArray[np.float32],
    g: npt.NDArray[np.float32],
    eps: float,
    running_mean: Optional[npt.NDArray[np.float32]],
    running_var: Optional[npt.NDArray[np.float32]],
    weight: bool,
    bias: bool,
    scale: float,
    accumulate: bool,
    out: npt.NDArray[np.float32],
    groups: int = 0,
) -> bool: ...
