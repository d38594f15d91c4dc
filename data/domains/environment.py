"""Environments written for the `verifiers` package as domains: `vf:<taskset-id>`.

    grpo.domains=[vf:my_env]                      # an installed package exporting a Taskset
    "grpo.domains=['vf:my_env?limit=500&max_tool_turns=4']"     # options inline

A `verifiers` (>= 0.4, `verifiers.v1`) environment is a `Taskset` yielding `Task`s: a prompt,
tools (`Toolset`s with `@vf.tool` methods) and the task's own rubric (`@vf.reward` methods,
weighted and summed, and `@vf.metric`s). The id resolves as `verifiers` resolves it (a module
exporting its `Taskset` subclass through `__all__`, hub ids `owner/name@version` included), so
an environment someone published works here unchanged for GRPO, distillation and evaluation.

What runs where. v4lab generates: the rollout loop (`train/rollout.py`) samples each assistant
turn from the policy through its own engine, so log-probs, routes and kept sets stay exact. The
environment acts: a turn with DSML tool calls is answered by the task's toolsets, called in
this process through an in-memory MCP server (`mcp.MCPServer`, the server `verifiers`
itself builds for them, without its HTTP transport); a tool that fails answers `error: ...`.
The environment judges: `verify` rebuilds the conversation as a `verifiers` `Trace` (system,
user, each assistant turn with its tool calls, each tool result) and awaits `Task.score`, so
the rubric sees what it would see under `verifiers`' own runner. The reward is the rubric's
weighted sum clamped to [0, 1] (v4lab's rewards are in [0, 1]; a rubric that pays more than 1
for a perfect answer should be rescaled by its author); `correct` is reward >= 1.

Choices, stated: the split is a hash of each task's `key` (`test_fraction`, default 0.2), as
for every v4lab domain; a task has no reference answer, so SFT refuses these domains (use
them for GRPO, distillation and evaluation); tools are the environment's own trusted code and
run in-process, as `verifiers` runs them in a local subprocess (the sandbox in
`data.domains.sandbox` is for code the model writes). Refused when the domain is built,
before any step: tasks that need a container, a judge model or a runtime in their rubric, and
toolsets with shared state (those sync through `verifiers`' HTTP state channel). The
`verifiers` episode runners (harness programs, user simulators, multi-agent envs) are not
used: their programs are installed by `uv` from the network and call an outside model.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import re
import threading
from collections import OrderedDict
from typing import Any, Mapping

from data.domains.base import (Domain, IndexedRows, Item, Score, parse_answer_turn,
                               parse_tool_turn, split_of)
from data.optional import require
from encoding import encode_messages
from encoding.special_tokens import ASSISTANT, EOS, TOOL_RESULT_END, TOOL_RESULT_START, USER

PREFIX = "vf:"
LIVE_SERVERS = 256  # tasks whose toolsets stay set up (a rollout's prompts, and then some)
RESULT = re.compile(re.escape(TOOL_RESULT_START) + "(.*?)" + re.escape(TOOL_RESULT_END), re.S)


def _vf():
    return require("verifiers.v1", "vf: domains", "env", "verifiers>=0.4")


class VerifiersDomain(IndexedRows, Domain):
    """The tasks of a `verifiers` taskset as items (see the module docstring)."""

    levels = (None,)
    references = False  # no reference answers: GRPO, distillation and evaluation only

    def __init__(self, taskset: str, difficulty: int | None = None, thinking_mode: str = "chat",
                 limit: int | None = None, test_fraction: float = 0.2,
                 max_tool_turns: int = 4, tool_seconds: float = 30.0,
                 score_seconds: float = 60.0) -> None:
        self.name = f"{PREFIX}{taskset}"
        super().__init__(difficulty, thinking_mode)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"{self.name}: limit={limit!r}: expected an int >= 1")
        for option, value, low in (("test_fraction", test_fraction, 0), ("tool_seconds",
                                   tool_seconds, 0), ("score_seconds", score_seconds, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low \
                    or (option == "test_fraction" and value >= 1):
                raise ValueError(f"{self.name}: {option}={value!r}: out of range")
        if isinstance(max_tool_turns, bool) or not isinstance(max_tool_turns, int) \
                or max_tool_turns < 1:
            raise ValueError(f"{self.name}: max_tool_turns={max_tool_turns!r}: expected an "
                             f"int >= 1")
        self.test_fraction, self.max_tool_turns = test_fraction, max_tool_turns
        self.tool_seconds, self.score_seconds = tool_seconds, score_seconds
        self._loop = asyncio.new_event_loop()  # toolsets keep their resources on one loop
        self._lock = threading.Lock()
        self._servers: OrderedDict[str, Any] = OrderedDict()  # task key -> its live toolsets
        self._schemas: dict[str, list[dict[str, Any]]] = {}  # task class + config -> tools
        self.tasks: dict[str, Any] = {}
        self.rows = {"train": [], "test": []}
        for task in self._load(taskset, limit):
            self._add(task)
        for split, rows in self.rows.items():
            if not rows:
                raise ValueError(f"{self.name}: the {split!r} split has no tasks "
                                 f"({len(self.tasks)} in all; test_fraction={test_fraction})")

    # ---- loading -------------------------------------------------------------------------
    def _load(self, taskset_id: str, limit: int | None) -> list[Any]:
        vf = _vf()
        try:
            taskset = _taskset_class(taskset_id)(vf.TasksetConfig(id=taskset_id))
        except (ImportError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{self.name}: cannot load the taskset: {error}") from None
        if limit is not None:
            taskset = taskset.take(limit)
        elif not taskset.bounded:
            raise ValueError(f"{self.name}: the taskset is infinite; give `limit`")
        self._shared_toolsets = type(taskset).toolsets(taskset.config)  # set up once, here
        for toolset in self._shared_toolsets:
            self._run(toolset.setup(), self.tool_seconds)
        return list(taskset)

    def _add(self, task: Any) -> None:
        where = f"{self.name}: task {task.data.idx} ({type(task).__name__})"
        why = _unsupported(task)
        if why:
            raise ValueError(f"{where}: {why}")
        if task.key in self.tasks:
            raise ValueError(f"{where}: key {task.key[:12]} repeats an earlier task")
        self.tasks[task.key] = task
        problem = {"key": task.key, "idx": task.data.idx, "id": task.data.id,
                   "prompt": _prompt_messages(task.data), "tools": self._tools(task)}
        self.rows[split_of(self.name, task.key, self.test_fraction)].append(problem)

    def _tools(self, task: Any) -> list[dict[str, Any]]:
        """The tool schemas of a task's toolsets (set by its class and config, so listed once
        per pair, without setting the toolsets up)."""
        kind = f"{type(task).__qualname__}:{task.config.model_dump_json()}"
        if kind not in self._schemas:
            server, _ = self._register(task)
            tools = self._run(server.list_tools(), self.tool_seconds)
            self._schemas[kind] = [_schema(t) for t in tools]
        return self._schemas[kind]

    def _register(self, task: Any):
        from mcp.server.mcpserver import MCPServer

        server = MCPServer(type(task).__name__)
        toolsets = [*self._shared_toolsets, *type(task).toolsets(task.config)]
        for toolset in toolsets:
            if toolset._state_cls is not _vf().State:
                raise ValueError(f"{self.name}: toolset {type(toolset).__name__} keeps shared "
                                 f"state, which needs verifiers' HTTP state channel")
            toolset.register(server)
        return server, toolsets

    def _server(self, task: Any):
        """The task's in-memory MCP server, its own toolsets set up for it (`setup`, then
        `setup_task`, as `verifiers` does per rollout; the taskset's shared ones were set up
        once), kept for the most recent tasks."""
        if task.key not in self._servers:
            server, toolsets = self._register(task)
            for toolset in toolsets[len(self._shared_toolsets):]:  # the task's own
                self._run(toolset.setup(), self.tool_seconds)
                self._run(toolset.setup_task(task), self.tool_seconds)
            self._servers[task.key] = server
            while len(self._servers) > LIVE_SERVERS:
                self._servers.popitem(last=False)
        self._servers.move_to_end(task.key)
        return self._servers[task.key]

    def _run(self, coroutine, seconds: float):
        with self._lock:
            return self._loop.run_until_complete(asyncio.wait_for(coroutine, seconds))

    # ---- items ---------------------------------------------------------------------------
    def item_key(self, problem: Mapping[str, Any]) -> str:
        return problem["key"]

    def render(self, problem: Mapping[str, Any]) -> tuple[list[dict], list[dict], str]:
        messages = [dict(m) for m in problem["prompt"]]
        if problem["tools"]:
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": ""})
            messages[0]["tools"] = list(problem["tools"])
        return messages, [], ""

    # ---- acting --------------------------------------------------------------------------
    def run_tool_calls(self, assistant_message: Mapping[str, Any],
                       item: Item | None = None) -> list[dict[str, Any]]:
        """The tool messages answering every call of a parsed assistant message, from the
        item's task's toolsets; a failing or unknown tool answers `error: ...`."""
        if item is None:
            raise ValueError(f"{self.name}: tool calls need the item (its task's toolsets)")
        server = self._server(self.tasks[item.problem["key"]])
        return [{"role": "tool", "content": self._call(server, call)}
                | ({"tool_call_id": call["id"]} if isinstance(call.get("id"), str) else {})
                for call in assistant_message.get("tool_calls") or ()]

    def _call(self, server, call: Mapping[str, Any]) -> str:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments or "{}")
            result = self._run(server.call_tool(function.get("name"), arguments),
                               self.tool_seconds)
        except Exception as error:  # noqa: BLE001 - the model's call failed, not the run
            return f"error: {type(error).__name__}: {error}"[:500]
        text = "\n\n".join(getattr(part, "text", "") for part in result.content)
        return f"error: {text}" if result.is_error else text

    # ---- judging -------------------------------------------------------------------------
    def verify(self, item: Item, completion_text: str) -> Score:
        if not isinstance(completion_text, str):
            return Score.invalid(f"completion is a {type(completion_text).__name__}, not text")
        turns = self._turns(item, completion_text)
        if isinstance(turns, Score):
            return turns
        trace = self._trace(item, turns)
        try:
            self._run(self.tasks[item.problem["key"]].score(trace), self.score_seconds)
        except asyncio.TimeoutError:
            return Score.invalid(f"the rubric took more than {self.score_seconds} s")
        scores = {name: r.score for name, r in trace.rewards.items() if r is not None}
        return Score.partial(trace.reward, f"rubric {scores}"[:200])

    def _turns(self, item: Item, text: str) -> list[dict[str, Any]] | Score:
        """The transcript as messages (assistant turns, tool results), or why it is invalid:
        each tool turn must be followed by exactly the results our loop inserts."""
        mode, history, turns, pos = item.thinking_mode, list(item.prompt_messages), [], 0
        while True:
            end = text.find(EOS, pos)
            if end == -1:
                return Score.invalid(f"missing_eos: turn {len(turns) // 2 + 1} did not finish")
            turn, pos = text[pos:end + len(EOS)], end + len(EOS)
            if not text.startswith(USER, pos):
                message, why = parse_answer_turn(turn, mode)
                if message is None:
                    return Score.invalid(why)
                if message["tool_calls"]:
                    return Score.invalid("ended on a tool call (no answer)")
                return turns + [message]
            message, why = parse_tool_turn(turn, mode)
            if message is None:
                return Score.invalid(why)
            stop = text.find(ASSISTANT, pos)
            found = RESULT.findall(text[pos:stop if stop != -1 else len(text)])
            results = [{"role": "tool", "content": r} for r in found]
            environment = encode_messages(results, mode, context=history + [message])
            if len(results) != len(message["tool_calls"]) or not text.startswith(environment,
                                                                                  pos):
                return Score.invalid("the tool results are not what the environment returned")
            pos += len(environment)
            history += [message, *results]
            turns += [message, *results]

    def _trace(self, item: Item, turns: list[dict[str, Any]]):
        """A `verifiers` Trace of the conversation, as its rubric reads it."""
        vf = _vf()
        from verifiers.v1.graph import MessageNode
        from verifiers.v1.trace import AgentInfo, TraceTask

        task = self.tasks[item.problem["key"]]
        messages, ids = [], itertools.count()
        for message in item.problem["prompt"]:
            cls = vf.SystemMessage if message["role"] == "system" else vf.UserMessage
            messages.append((cls(content=message["content"]), False))
        calls: list[str] = []
        for message in turns:
            if message["role"] == "tool":
                messages.append((vf.ToolMessage(content=message["content"],
                                                tool_call_id=calls.pop(0)), False))
                continue
            tool_calls = [vf.ToolCall(id=f"call_{next(ids)}", name=c["function"]["name"],
                                      arguments=_arguments(c["function"].get("arguments")))
                          for c in message["tool_calls"] or ()]
            calls = [c.id for c in tool_calls]
            messages.append((vf.AssistantMessage(
                content=message["content"], reasoning_content=message.get("reasoning_content"),
                tool_calls=tool_calls or None), True))
        nodes = [MessageNode(parent=i - 1 if i else None, message=m, sampled=s)
                 for i, (m, s) in enumerate(messages)]
        return vf.Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key),
                        agent=AgentInfo(config=vf.AgentConfig()), nodes=nodes,
                        is_completed=True, ok=True)


def _taskset_class(taskset_id: str) -> type:
    """The Taskset class an id names: as `verifiers` resolves it (an installed package, a hub
    id `owner/name@version`), or, for a dotted module path (`my_pkg.envs.adder`, which
    `verifiers`' own loader does not take), the one Taskset subclass the module exports."""
    if "." not in taskset_id:
        from verifiers.v1.utils.loaders import taskset_class

        return taskset_class(taskset_id)
    import importlib

    module = importlib.import_module(taskset_id)
    names = getattr(module, "__all__", None) or dir(module)
    found = [getattr(module, n) for n in names
             if isinstance(getattr(module, n, None), type)
             and issubclass(getattr(module, n), _vf().Taskset)
             and getattr(module, n).__module__ == module.__name__]
    if len(found) != 1:
        raise ValueError(f"module {taskset_id!r} exports {len(found)} Taskset subclasses "
                         f"(need exactly one, listed in __all__)")
    return found[0]


def _unsupported(task: Any) -> str:
    """Why v4lab cannot run this task in-process, or ''."""
    if task.NEEDS_CONTAINER or task.data.image:
        return "needs a container (verifiers' docker/prime runtimes), not supported here"
    if task.config.judges:
        return "its rubric calls a judge model, not supported here"
    for fn in task.hooks("reward") + task.hooks("metric"):
        param = inspect.signature(fn).parameters.get("runtime")
        if param is not None and param.default is inspect.Parameter.empty:
            return f"its rubric's {fn.__name__!r} needs a runtime (a container)"
    if not task.data.prompt:
        return "has no prompt (an environment whose user opens with a simulator)"
    return ""


def _prompt_messages(data: Any) -> list[dict[str, Any]]:
    """TaskData's system prompt and prompt (text or messages) as plain chat messages."""
    messages = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if isinstance(data.prompt, str):
        return messages + [{"role": "user", "content": data.prompt}]
    for message in data.prompt:
        if message.role not in ("system", "user"):
            raise ValueError(f"task {data.idx}: a {message.role!r} message in the prompt is "
                             f"not supported (system and user only)")
        text = message.content if isinstance(message.content, str) else \
            "\n\n".join(getattr(p, "text", "") for p in message.content)
        messages.append({"role": message.role, "content": text})
    return messages


def _schema(tool: Any) -> dict[str, Any]:
    """An MCP tool as the OpenAI-style function schema V4's tools block renders."""
    return {"type": "function", "function": {"name": tool.name,
                                             "description": tool.description or "",
                                             "parameters": tool.input_schema}}


def _arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})
