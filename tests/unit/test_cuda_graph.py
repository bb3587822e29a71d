"""CachedStepGraph on the CPU: the eager path, and, with torch.cuda's graph calls replaced by a recording fake,
that every input tensor (latents, timestep, and Instruct-Distil's guidance and r) reaches each replay."""

import contextlib

import pytest
import torch

from omni_ep.pipelines import cuda_graph
from omni_ep.pipelines.cuda_graph import CachedStepGraph

pytestmark = pytest.mark.timeout(30)


class FakeGraph:
    """Stands for torch.cuda.CUDAGraph: capture records the step and the tensors it ran on; replay runs it again on
    those same tensors and writes into the captured output, as a real graph does."""

    capturing: "FakeGraph | None" = None

    def replay(self):
        self.output.copy_(self.fn(*self.args))


def step(latents, t, guidance, r):
    """A step that uses every input: velocity = latents * t + guidance - r (per row)."""
    out = latents * t[:, None, None, None] + (guidance - r)[:, None, None, None]
    graph = FakeGraph.capturing
    if graph is not None:
        graph.fn, graph.args, graph.output = step, (latents, t, guidance, r), out
    return out


@contextlib.contextmanager
def fake_capture(graph):
    FakeGraph.capturing = graph
    try:
        yield
    finally:
        FakeGraph.capturing = None


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(cuda_graph.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cuda_graph.torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda_graph.torch.cuda, "empty_cache", lambda: None)


def inputs(i):
    """Step i's inputs: every one of them changes from step to step (r like MeanFlow's next timestep)."""
    latents = torch.full((1, 2, 2, 2), float(i + 1))
    return latents, torch.tensor([1000.0 - 100 * i]), torch.tensor([2496.0]), torch.tensor([900.0 - 100 * i])


def test_first_call_runs_eagerly_without_cuda():
    graph = CachedStepGraph(step)
    torch.testing.assert_close(graph(*inputs(0)), step(*inputs(0)))
    assert not graph.captured and graph.error is None


def test_every_input_tensor_reaches_each_replay(fake_cuda):
    graph = CachedStepGraph(step)
    outputs = [graph(*inputs(i)).clone() for i in range(5)]
    assert graph.captured and graph.error is None
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, step(*inputs(i)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes 4 input tensors, got 2"):
        graph(*inputs(0)[:2])


def test_a_rank_that_failed_to_capture_makes_every_rank_eager(fake_cuda):
    graph = CachedStepGraph(step, all_ranks_ok=lambda ok: False)
    outputs = [graph(*inputs(i)) for i in range(3)]
    assert not graph.captured and graph.error == "another rank could not capture the step"
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, step(*inputs(i)), rtol=0, atol=0)
