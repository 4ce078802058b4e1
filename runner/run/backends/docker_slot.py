"""A study slot as a container (`runner.run.slots`): one container of the plugin image runs many points.

The container mounts the slot's control folder (read-only) and points folder (read-write); a point's
output folders are moved into the points folder while it runs (`runner.run.slots.stage_outputs`),
since a running container cannot be given new mounts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from runner.run.jobs import CoreJob, Place
from runner.run.records import Experiment
from runner.run.slots import describe_exit, stage_outputs, unstage_outputs

log = logging.getLogger(__name__)


class DockerSlot:
    def __init__(self, container, job: CoreJob, user: str):
        self.container = container
        self.ident = container.id
        self.container_id = container.id
        self.job = job
        self.owner = tuple(int(x) for x in user.split(":"))
        self.points = next(p.host for p in job.places if p.inside.endswith("/points"))

    @classmethod
    def start(cls, backend, job: CoreJob) -> DockerSlot:
        from runner import engine
        from runner.run.backends.docker import give_places_to

        spec = backend.spec(job)
        give_places_to(job, spec.user)
        container = engine.run_container(backend.handle.require(), spec.image, **spec.engine_kwargs())
        return cls(container, job, spec.user)

    def path(self, place: Place) -> str:
        return place.inside

    def chunks(self):
        from runner import engine

        yield from engine.log_chunks(self.container, follow=True)

    def wait(self, timeout: float | None = None) -> int | None:
        from runner import engine

        try:
            return engine.wait(self.container, timeout=timeout)
        except Exception:  # the SDK's read timeout: still running
            return None

    def ended_why(self, exit_code: int | None) -> str:
        from runner import engine

        if engine.container_state(self.container).get("oom_killed"):
            return "out of memory (resources.memory)"
        return describe_exit(exit_code)

    def terminate(self, timeout: int) -> None:
        from runner import engine

        engine.stop(self.container, timeout=timeout)

    def close(self) -> None:
        from runner import engine

        engine.remove_container(self.container)

    def stage(self, exp: Experiment) -> str:
        import os

        stage_outputs(self.points, exp, self.owner if os.geteuid() == 0 else None)
        return f"{next(p.inside for p in self.job.places if p.inside.endswith('/points'))}/{exp.id}"

    def outputs(self, exp: Experiment) -> Path:
        return self.points / exp.id

    def unstage(self, exp: Experiment) -> list[str]:
        return unstage_outputs(self.points, exp)
