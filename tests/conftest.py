import logging
import os

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny HunyuanImage-3.0 checkpoint (released layout, 8 experts top-2), written once per session."""
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(os.fspath(tmp_path_factory.mktemp("tiny-hunyuan-image3")))


@pytest.fixture(scope="session")
def tiny_distil_checkpoint(tmp_path_factory) -> str:
    """The tiny HunyuanImage-3.0-Instruct-Distil checkpoint (released layout), written once per session."""
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config, write_tiny_checkpoint

    path = os.fspath(tmp_path_factory.mktemp("tiny-hunyuan-image3-instruct-distil"))
    return write_tiny_checkpoint(path, config=tiny_config(variant="instruct-distil"))


@pytest.fixture(autouse=True)
def no_leaked_parallel_state():
    """The parallel state is per process: a test that made one (directly, or through a loader that makes the
    single-process default) must not hand it to the next test."""
    yield
    from omni_ep.distributed import destroy_parallel_state

    destroy_parallel_state()


@pytest.fixture
def restore_logger():
    """Undo ``configure_logging`` (the CLI's main calls it): the ``omni_ep`` logger's handlers, level and propagation
    as they were, so caplog sees the next test's records."""
    from omni_ep.logger import ROOT_LOGGER

    logger = logging.getLogger(ROOT_LOGGER)
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
