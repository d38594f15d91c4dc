"""A small environment written for the `verifiers` package (>= 0.4), as an outside author
would write one, for the `vf:` domain's tests: `vf:tests.helpers.vf_adder`.

Each task asks for a sum; the `add` tool (a `Toolset`) computes it; the rubric pays 0.5 for
calling the tool and 0.5 for the right final reply, and records the number of tool calls as a
metric. A taskset-wide `hint` tool is shared by every task. `vf_judged` (a task needing a
container) exercises the refusals."""

import verifiers.v1 as vf


class AddData(vf.TaskData):
    answer: int


class AddTools(vf.Toolset):
    @vf.tool
    def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b


class AddTask(vf.Task[AddData, vf.State, vf.TaskConfig]):
    @classmethod
    def toolsets(cls, config):
        return [AddTools(vf.ToolsetConfig())]

    @vf.reward(weight=0.5)
    async def used_tool(self, trace) -> float:
        return float(any(m.tool_calls for m in trace.assistant_messages))

    @vf.reward(weight=0.5)
    async def correct(self, trace) -> float:
        return float(trace.last_reply == str(self.data.answer))

    @vf.metric
    async def tool_calls(self, trace) -> float:
        return float(len(trace.tool_messages))


class HintTools(vf.Toolset):
    """A taskset-wide toolset (one instance for every task): `setup` runs once."""

    setups = 0

    async def setup(self) -> None:
        HintTools.setups += 1

    @vf.tool
    def hint(self) -> str:
        """A hint for any task."""
        return "add the two numbers"


class AdderTaskset(vf.Taskset[AddTask, vf.TasksetConfig]):
    @classmethod
    def toolsets(cls, config):
        return [HintTools(vf.ToolsetConfig())]

    def load(self):
        for a in range(12):
            for b in (3, 17):
                yield AddTask(AddData(prompt=f"What is {a} + {b}? Use the add tool.",
                                      answer=a + b, id=f"add-{a}-{b}"))


__all__ = ["AdderTaskset"]
