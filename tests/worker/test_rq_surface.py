"""The RQ and redis-py names the RQ side relies on (worker/rqside/surface.py) exist on the
installed, pinned versions, as what we use them as; and only worker/rqside/ imports rq or
touches a private name of it.

An RQ upgrade that renames or reshapes any of them fails here, in one place, naming it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.connection import AbstractConnection
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker.base import BaseWorker

from worker.rqside.surface import PRIVATE, SURFACE, Name

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "worker"
RQ_SIDE = {"redis_batch.py"}        # records redis-py pipelines for the RQ side's scripts


def _instance(cls: type, r: redis.Redis) -> Any:
    """An instance to look for attributes set in __init__, or None."""
    if issubclass(cls, Job):
        return Job("surface", connection=r)
    if issubclass(cls, Execution):
        return Execution("surface", "surface", connection=r)
    if issubclass(cls, BaseWorker):
        return BaseWorker(["surface"], connection=r)
    if issubclass(cls, redis.Redis):
        return r
    if issubclass(cls, AbstractConnection):
        return r.connection_pool.make_connection()
    return None


def _resolve(name: Name) -> tuple[Any, Any]:
    """(the object named, the class it is found on or None)."""
    obj: Any = importlib.import_module(name.module)
    owner = None
    for part in name.qualname.split("."):
        owner = obj if inspect.isclass(obj) else owner
        if not hasattr(obj, part) and owner is not None:
            return inspect.getattr_static(owner, part, None), owner
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    return obj, owner


@pytest.mark.parametrize("name", SURFACE, ids=lambda n: f"{n.module}:{n.qualname}")
def test_each_name_the_rq_side_uses_exists_as_used(name: Name, r: redis.Redis) -> None:
    obj, owner = _resolve(name)
    if name.kind == "callable":
        assert obj is not None, f"{name.module}:{name.qualname} is gone"
        func = obj.__func__ if isinstance(obj, staticmethod | classmethod) else obj
        assert callable(func), f"{name.qualname} is no longer callable"
        if name.params:         # (a C function, hiredis's, may have no signature to read)
            params = set(inspect.signature(func).parameters)
            missing = [p for p in name.params if p not in params]
            assert not missing, f"{name.qualname} no longer takes {missing}: {sorted(params)}"
    else:
        attr = name.qualname.rsplit(".", 1)[-1]
        found = obj is not None or (owner is not None and (
            hasattr(owner, attr) or hasattr(_instance(owner, r), attr)))
        assert found, f"{name.module}:{name.qualname} is gone"
    if name.qualname.rsplit(".", 1)[-1].startswith("_") and \
            not name.qualname.endswith("__init__"):
        assert name.why, f"private {name.qualname} must say why we use it"


def _worker_modules() -> list[Path]:
    return sorted(WORKER.rglob("*.py"))


def _rq_side(path: Path) -> bool:
    return path.parent == WORKER / "rqside" or path.name in RQ_SIDE


def test_only_the_rq_side_imports_rq() -> None:
    """Only worker/rqside/surface.py, beside the table of the names it imports: a new RQ
    name cannot be used without passing the table's module."""
    offenders = []
    for path in _worker_modules():
        if path == WORKER / "rqside" / "surface.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n == "rq" or n.startswith("rq.")]
    assert not offenders, offenders


def test_private_library_names_are_used_only_on_the_rq_side() -> None:
    """Any `x._name` of RQ, redis-py or Starlette's privates we know of, outside the RQ
    side; our own private members (self._x) are not theirs, so only the surface's private
    names and redis-py's command stack are looked for."""
    watched = set(PRIVATE) | {"command_stack", "_body"}
    offenders = []
    for path in _worker_modules():
        if _rq_side(path):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in watched:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_every_private_name_the_rq_side_uses_is_declared() -> None:
    """The RQ side's `x._name` of an RQ object, each in SURFACE: a private name used but
    not declared would not be checked by the first test."""
    ours = set()            # our own private members, defined in the RQ side's modules
    used = {}
    for path in _worker_modules():
        if not _rq_side(path):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.startswith("_"):
                ours.add(node.name)
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                            and t.value.id == "self" and path.name != "worker_object.py":
                        ours.add(t.attr)
                    if isinstance(t, ast.Name):
                        ours.add(t.id)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
    undeclared = {a: where for a, where in used.items() if a not in ours and a not in PRIVATE}
    assert not undeclared, undeclared


def test_the_fields_rq_layout_writes_are_rqs(r: redis.Redis) -> None:
    """The hash and stream fields rqside/layout.py's scripts write by hand are those RQ's own
    methods write (recorded, never executed), and each script names each of them."""
    from rq.job import JobStatus
    from rq.results import Result
    from rq.utils import now

    from contract.keys import JOB_FUNC, SERIALIZER
    from contract.recorder import Recorder
    from worker.rqside import layout

    job = Job.create(JOB_FUNC, kwargs={"model": "tiny"}, connection=r, serializer=SERIALIZER)
    assert tuple(Execution("e", job.id, r, worker_name="w").serialize()) == \
        layout.EXECUTION_FIELDS

    commands: list[tuple[Any, ...]] = []
    job.prepare_for_execution("w", pipeline=Recorder(r, commands))
    assert [c[0] for c in commands] == ["HSET"]
    assert tuple(commands[0][2::2]) == layout.JOB_START_FIELDS

    before = job.to_dict(include_meta=False, include_result=False)
    job.ended_at, job._status = now(), JobStatus.FINISHED      # what _handle_success changes
    after = job.to_dict(include_meta=False, include_result=False)
    assert {k for k in after if after[k] != before.get(k)} == set(layout.JOB_SUCCESS_FIELDS)

    result = Result(job.id, Result.Type.SUCCESSFUL, r, return_value={"a": 1}, worker_name="w",
                    serializer=job.serializer, execution_id="e", execution_started_at=now(),
                    execution_ended_at=now())
    assert tuple(result.serialize()) == layout.RESULT_FIELDS

    worker = BaseWorker(["surface"], connection=r)
    commands = []
    p = Recorder(r, commands)
    worker.heartbeat(60, pipeline=p)
    worker.set_state("busy", pipeline=p)
    worker.increment_successful_job_count(pipeline=p)
    worker.increment_total_working_time(now() - now(), p)
    written = [c[2] for c in commands if c[0] in ("HSET", "HINCRBY", "HINCRBYFLOAT")]
    assert tuple(written) == layout.WORKER_FIELDS

    scripts = layout._START + layout._SUCCEED
    for f in (layout.EXECUTION_FIELDS + layout.JOB_START_FIELDS
              + layout.JOB_SUCCESS_FIELDS + layout.RESULT_FIELDS + layout.WORKER_FIELDS):
        assert f"'{f}'" in scripts, f"layout.py's scripts do not write {f}"


@pytest.mark.parametrize("serializer", [None, "json", "rq.serializers.JSONSerializer",
                                        JSONSerializer])
def test_batch_jobs_are_rqs_jobs(r: redis.Redis, serializer: Any) -> None:
    """BatchJob resolves each serializer once (jobs._resolve_serializer), relying on
    RQ's Job.__init__ using its serializer argument only to set `serializer`: a new job is
    RQ's own, attribute by attribute, and so is one restored from a hash."""
    from worker.rqside.jobs import bound_job_class

    cls = bound_job_class(None)
    for _ in range(2):                      # resolved, then remembered
        ours, theirs = cls("same-id", connection=r, serializer=serializer), \
            Job("same-id", connection=r, serializer=serializer)
        skip = {"created_at"}
        assert {k: v for k, v in vars(ours).items() if k not in skip} == \
            {k: v for k, v in vars(theirs).items() if k not in skip}
    stored = Job.create("contract.keys.JOB_FUNC", kwargs={"a": 1}, connection=r,
                        serializer=JSONSerializer).to_dict()
    ours, theirs = cls("x", connection=r, serializer=serializer), \
        Job("x", connection=r, serializer=serializer)
    ours.restore(stored)
    theirs.restore(stored)
    assert vars(ours) == vars(theirs)
