"""`--dist loadgroup` that keeps its groups on every pytest (tests/conftest.py registers it).

pytest-xdist 3.8 carries a test's `xdist_group` to its scheduler by appending "@group" to the
test's node id (`item._nodeid`); pytest 9.2 builds node ids from a structured id and ignores that
field, so the groups are silently dropped and a session-scoped server would start on every worker
(pytest-xdist issue #1386). Here each worker also writes node id -> group to a file the controller
names, before it reports its collection, and the controller's scheduler (xdist's LoadGroupScheduling
through the `pytest_xdist_make_scheduler` hook) reads the groups from there; a suffix xdist did
manage to add still wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from xdist.scheduler import LoadGroupScheduling

GROUPS_KEY = "sglang_step35_xdist_groups"


def item_groups(items) -> dict[str, str]:
    """node id -> its xdist_group name (the first mark's), for the items that have one."""
    out = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is not None:
            out[item.nodeid] = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return out


class _Scheduling(LoadGroupScheduling):
    def __init__(self, config, log, path: Path):
        super().__init__(config, log)
        self._path, self._groups = path, None

    def _split_scope(self, nodeid: str) -> str:
        scope = super()._split_scope(nodeid)
        if scope != nodeid:  # xdist's own "@group" suffix survived on this pytest
            return scope
        if self._groups is None:  # every worker wrote the file before reporting its collection
            self._groups = json.loads(self._path.read_text() or "{}")
        return self._groups.get(nodeid, nodeid)


class XdistGroups:
    """The plugin: controller side (file name, scheduler) and worker side (the file)."""

    def __init__(self, config: pytest.Config):
        self.worker_path = getattr(config, "workerinput", {}).get(GROUPS_KEY)
        self.path = None
        if self.worker_path is None and config.getvalue("dist") == "loadgroup":
            fd, name = tempfile.mkstemp(prefix="step35-xdist-groups-", suffix=".json")
            os.close(fd)
            self.path = Path(name)

    def pytest_configure_node(self, node):
        if self.path is not None:
            node.workerinput[GROUPS_KEY] = str(self.path)

    def pytest_xdist_make_scheduler(self, config, log):
        return _Scheduling(config, log, self.path) if self.path is not None else None

    @pytest.hookimpl(tryfirst=True)  # before xdist's worker sends its collection to the controller
    def pytest_collection_finish(self, session):
        if self.worker_path is not None:
            tmp = f"{self.worker_path}.{os.getpid()}"
            Path(tmp).write_text(json.dumps(item_groups(session.items)))
            os.replace(tmp, self.worker_path)  # workers collect the same items: either file is the map

    def pytest_unconfigure(self, config):
        if self.path is not None:
            self.path.unlink(missing_ok=True)
