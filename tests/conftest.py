import os

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny HunyuanImage-3.0 checkpoint (released layout, 8 experts top-2), written once per session."""
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(os.fspath(tmp_path_factory.mktemp("tiny-hunyuan-image3")))
