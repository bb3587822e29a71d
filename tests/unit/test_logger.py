"""One logger hierarchy: levels from -q/-v, rank prefixes under several ranks, quiet ranks other than 0, and no
print in the library."""

import ast
import logging
from pathlib import Path

from omni_ep.logger import configure_logging


def test_levels_and_rank_prefixes(capsys, restore_logger):
    log = logging.getLogger("omni_ep.some.module")
    configure_logging(0, rank=1, world_size=2)
    log.info("info of rank 1")  # ranks other than 0 keep to warnings unless -v
    log.warning("warning of rank 1")
    configure_logging(1, rank=1, world_size=2)
    log.debug("debug of rank 1")
    configure_logging(-1, rank=0, world_size=1)
    log.info("info under -q")
    log.warning("warning under -q")
    configure_logging(0, rank=0, world_size=1)
    log.info("info of one process")
    log.debug("debug without -v")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[rank 1/2] WARNING warning of rank 1", "[rank 1/2] DEBUG debug of rank 1",
                     "WARNING warning under -q", "INFO info of one process"]


def test_the_library_does_not_print():
    package = Path(__file__).resolve().parents[2] / "omni_ep"
    calls = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert calls == [], "log through logging.getLogger(__name__) instead"
