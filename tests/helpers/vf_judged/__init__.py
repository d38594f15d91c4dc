"""A `verifiers` taskset whose task needs a container: the `vf:` domain refuses it."""

import verifiers.v1 as vf


class BoxTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    NEEDS_CONTAINER = True


class BoxTaskset(vf.Taskset[BoxTask, vf.TasksetConfig]):
    def load(self):
        yield BoxTask(vf.TaskData(prompt="ls /"))


__all__ = ["BoxTaskset"]
