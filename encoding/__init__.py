"""DeepSeek-V4 chat format: byte-exact prompt encoding, completion parsing, tokenizer side.

SFT data, RL prompts, distillation rollouts and chat generation all go through this package:
- `encode_messages` / `parse_message_from_completion_text`: the released encoder's API;
- `load_tokenizer` / `tokenize_conversation`: token ids plus the SFT loss mask;
- `CHAT_TEMPLATE`: a Jinja bridge for tooling that only knows `apply_chat_template`.
"""

from encoding.chat_template import CHAT_TEMPLATE
from encoding.encode import encode_messages
from encoding.parse import ParseError, parse_message_from_completion_text
from encoding.tokenizer import load_tokenizer, tokenize_conversation

__all__ = [
    "CHAT_TEMPLATE",
    "ParseError",
    "encode_messages",
    "load_tokenizer",
    "parse_message_from_completion_text",
    "tokenize_conversation",
]
