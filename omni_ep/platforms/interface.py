"""A platform: which class implements each diffusion op on one kind of device, and what the op needs first."""

from __future__ import annotations


class OmniPlatform:
    """Base of the CUDA, NPU and CPU platforms (and of out-of-tree ones)."""

    name: str = ""
    device_type: str = ""
    dist_backend: str = "gloo"
    # op name -> qualified name of the class implementing it on this platform
    diffusion_ops: dict[str, str] = {}

    def __init__(self):
        self._prepared: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def _check_op(self, op_name: str) -> None:
        if op_name not in self.diffusion_ops:
            raise ValueError(
                f"unknown diffusion op {op_name!r} on platform {self.name!r}; known ops: {', '.join(sorted(self.diffusion_ops))}"
            )

    def get_diffusion_model_impl_qualname(self, op_name: str) -> str:
        """Qualified name of the class that implements ``op_name`` here."""
        self._check_op(op_name)
        return self.diffusion_ops[op_name]

    def prepare_diffusion_op_runtime(self, op_name: str) -> None:
        """Make ready what ``op_name`` needs on this platform before a layer of it is built (idempotent):
        device libraries, kernel configs. The process groups are the caller's: ``init_parallel_state`` first."""
        self._check_op(op_name)
        if op_name in self._prepared:
            return
        self._prepare_op(op_name)
        self._prepared.add(op_name)

    def _prepare_op(self, op_name: str) -> None:
        """Platform hook: kernel configs, device libraries. Nothing by default."""
