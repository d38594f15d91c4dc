"""The DeepSeek-V4 special strings (spec §9.1), shared by the chat encoder and the tokenizer trainer.

Fullwidth bar is U+FF5C, the word separator U+2581. BOS and EOS come first so that a tokenizer the
project trains gets BOS id 0 and EOS id 1, as the released tokenizer has. Ids of the other strings
must always be read from the tokenizer, never assumed.
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"
TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"

# Quick-instruction task tokens (spec §9.6); `extracted_url` is listed by the release README.
TASK_TOKENS = {
    name: f"<｜{name}｜>"
    for name in ("action", "query", "authority", "domain", "title", "read_url", "extracted_url")
}

# Every string that must be a single, never-split token, in id order for a freshly trained
# tokenizer. DSML tags carry attributes (`<｜DSML｜invoke name="...">`), so the tags are not single
# tokens: the `｜DSML｜` marker inside them is the reserved string.
SPECIAL_TOKENS = [
    BOS,
    EOS,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    THINK_START,
    THINK_END,
    DSML,
    TOOL_RESULT_START,
    TOOL_RESULT_END,
    *TASK_TOKENS.values(),
]
