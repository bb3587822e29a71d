"""The parallel layout of one run: TP x SP (ulysses x ring) x CFG x DP x PP, and expert parallel on top."""

from __future__ import annotations

from dataclasses import dataclass

ALL2ALL_BACKENDS = ("allgather_reducescatter", "all2all")
EXPERT_PLACEMENTS = ("linear", "round_robin", "balanced")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism, as vLLM-Omni's command-line flags name them.

    With ``enable_expert_parallel`` the MoE experts are split over every rank of a pipeline stage:
    ``expert_parallel_size = TP x SP x CFG x DP``. Without it the experts are tensor-parallel over TP.
    """

    tensor_parallel_size: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    all2all_backend: str = "all2all"  # sparse: each token once to each rank holding one of its experts
    expert_placement: str = "linear"
    expert_loads: str | None = None  # placement "balanced": the JSON of recorded expert loads (expert_loads.py)

    def __post_init__(self):
        for name in (
            "tensor_parallel_size",
            "ulysses_degree",
            "ring_degree",
            "cfg_parallel_size",
            "data_parallel_size",
            "pipeline_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an integer >= 1, got {value!r}")
        if self.cfg_parallel_size not in (1, 2):
            raise ValueError(
                f"cfg_parallel_size must be 1 or 2 (one guidance branch per rank), got {self.cfg_parallel_size}"
            )
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(
                f"unknown all2all_backend {self.all2all_backend!r}; choose one of {', '.join(ALL2ALL_BACKENDS)}"
            )
        if self.expert_placement not in EXPERT_PLACEMENTS:
            raise ValueError(
                f"unknown expert_placement {self.expert_placement!r}; choose one of {', '.join(EXPERT_PLACEMENTS)}"
            )
        if (self.expert_placement == "balanced") != (self.expert_loads is not None):
            raise ValueError(
                'expert_placement "balanced" needs expert_loads (a JSON of recorded expert loads: '
                "--record-expert-loads), and expert_loads needs expert_placement \"balanced\"; got "
                f"expert_placement={self.expert_placement!r}, expert_loads={self.expert_loads!r}"
            )

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return (
            self.tensor_parallel_size
            * self.sequence_parallel_size
            * self.cfg_parallel_size
            * self.data_parallel_size
            * self.pipeline_parallel_size
        )

    @property
    def expert_parallel_size(self) -> int:
        if not self.enable_expert_parallel:
            return 1
        return self.world_size // self.pipeline_parallel_size

    def check_world_size(self, world_size: int) -> None:
        """Raise when the layout does not use exactly ``world_size`` processes."""
        if world_size != self.world_size:
            raise ValueError(
                f"the parallel layout needs {self.world_size} processes (TP {self.tensor_parallel_size} x "
                f"ulysses {self.ulysses_degree} x ring {self.ring_degree} x CFG {self.cfg_parallel_size} x "
                f"DP {self.data_parallel_size} x PP {self.pipeline_parallel_size}) but {world_size} were "
                f"launched; change the sizes or launch with torchrun --nproc-per-node {self.world_size}"
            )

    def describe(self) -> str:
        return (
            f"TP={self.tensor_parallel_size} SP={self.sequence_parallel_size} (ulysses={self.ulysses_degree} "
            f"ring={self.ring_degree}) CFG={self.cfg_parallel_size} DP={self.data_parallel_size} "
            f"PP={self.pipeline_parallel_size} EP={self.expert_parallel_size}"
            + (f" ({self.all2all_backend}, {self.expert_placement})" if self.enable_expert_parallel else "")
        )
