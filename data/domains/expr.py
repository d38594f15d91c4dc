"""A small, safe arithmetic-expression evaluator shared by `countdown` and `calculator`.

Model output and tool-call arguments are untrusted text, so they are never given to `eval`,
`exec`, `ast.literal_eval` or `compile`: this module reads them with its own tokenizer and a
recursive-descent parser that knows only non-negative integer literals, `+ - * /`, parentheses
and (optionally) unary minus. Anything else (a name, a dot, `**`, a call such as
`__import__('os')`) is a syntax error at the offending character.

Values are exact `Fraction`s, so `/` never rounds; `Evaluation.inexact_division` says whether
some division left a remainder (Countdown only allows exact division, the calculator returns
fractions). Bounds keep the work on hostile input tiny: at most `MAX_LENGTH` characters,
`MAX_DEPTH` nested parentheses/unary signs, `MAX_DIGITS` digits per literal and results below
`MAX_ABS` in absolute value (numerator and denominator).

Two error classes, because callers score them differently:
- `ExprSyntaxError`: not an expression of this grammar (a format failure);
- `ExprMathError`: a well-formed expression with no acceptable value (division by zero, too
  large): the answer was readable but is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_LENGTH = 256
MAX_DEPTH = 32
MAX_DIGITS = 30
MAX_ABS = 10**40
BINARY_OPS = ("+", "-", "*", "/")
# Lookalikes a model (or a person) may write; mapped to the ASCII operator.
_ALIASES = {"×": "*", "÷": "/", "−": "-"}
_DIGITS = "0123456789"  # ASCII only: str.isdigit() also accepts '²', which int() rejects


class ExprError(ValueError):
    """Base class of the evaluator's errors."""


class ExprSyntaxError(ExprError):
    """The text is not an expression of the grammar (message names the character offset)."""


class ExprMathError(ExprError):
    """The expression is well formed but has no acceptable value."""


@dataclass(frozen=True)
class Evaluation:
    value: Fraction
    numbers: tuple[int, ...]  # the integer literals, in reading order
    operators: tuple[str, ...]  # the binary operators applied, in evaluation order
    inexact_division: bool  # some `/` had a non-integer result


def _tokenize(text: str) -> list[tuple[str, int | str, int]]:
    """(kind, value, offset) triples; kind is "num" or "op" (operators and parentheses)."""
    tokens: list[tuple[str, int | str, int]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            if j - i > MAX_DIGITS:
                raise ExprSyntaxError(f"number at offset {i} has more than {MAX_DIGITS} digits")
            tokens.append(("num", int(text[i:j]), i))
            i = j
        elif c in "+-*/()" or c in _ALIASES:
            tokens.append(("op", _ALIASES.get(c, c), i))
            i += 1
        else:
            raise ExprSyntaxError(f"unexpected character {c!r} at offset {i}")
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, int | str, int]], allow_unary_minus: bool) -> None:
        self.tokens, self.pos, self.depth = tokens, 0, 0
        self.allow_unary_minus = allow_unary_minus
        self.numbers: list[int] = []
        self.operators: list[str] = []
        self.inexact = False

    def peek(self) -> str | None:
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "op":
            return str(self.tokens[self.pos][1])
        return None

    def where(self) -> str:
        if self.pos < len(self.tokens):
            return f"offset {self.tokens[self.pos][2]}"
        return "the end"

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.peek()
            self.pos += 1
            value = self.apply(op, value, self.term())
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.peek()
            self.pos += 1
            value = self.apply(op, value, self.factor())
        return value

    def factor(self) -> Fraction:
        if self.pos >= len(self.tokens):
            raise ExprSyntaxError("expected a number or '(' at the end")
        kind, value, offset = self.tokens[self.pos]
        if kind == "num":
            self.pos += 1
            self.numbers.append(int(value))
            return Fraction(int(value))
        if value in ("(", "-"):
            if value == "-" and not self.allow_unary_minus:
                raise ExprSyntaxError(f"unary minus at offset {offset} is not allowed")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprSyntaxError(f"nesting deeper than {MAX_DEPTH} at offset {offset}")
            self.pos += 1
            if value == "-":
                inner = -self.factor()
            else:
                inner = self.expr()
                if self.peek() != ")":
                    raise ExprSyntaxError(f"expected ')' at {self.where()}")
                self.pos += 1
            self.depth -= 1
            return inner
        raise ExprSyntaxError(f"expected a number or '(' at offset {offset}, found {value!r}")

    def apply(self, op: str, a: Fraction, b: Fraction) -> Fraction:
        self.operators.append(op)
        if op == "+":
            out = a + b
        elif op == "-":
            out = a - b
        elif op == "*":
            out = a * b
        else:
            if b == 0:
                raise ExprMathError("division by zero")
            out = a / b
            self.inexact = self.inexact or out.denominator != 1
        if abs(out.numerator) >= MAX_ABS or out.denominator >= MAX_ABS:
            raise ExprMathError(f"intermediate result beyond {MAX_ABS:.0e}")
        return out


def evaluate(text: str, *, allow_unary_minus: bool = True) -> Evaluation:
    """Evaluate `text` exactly. Raises ExprSyntaxError / ExprMathError (both ValueError)."""
    if not isinstance(text, str):
        raise ExprSyntaxError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExprSyntaxError(f"expression longer than {MAX_LENGTH} characters ({len(text)})")
    tokens = _tokenize(text)
    if not tokens:
        raise ExprSyntaxError("empty expression")
    parser = _Parser(tokens, allow_unary_minus)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise ExprSyntaxError(f"unexpected {parser.tokens[parser.pos][1]!r} at {parser.where()}")
    return Evaluation(value, tuple(parser.numbers), tuple(parser.operators), parser.inexact)


def format_value(value: Fraction) -> str:
    """`7`, `-3` or `7/2`: the exact text the calculator tool returns."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def parse_number(text: str) -> Fraction | None:
    """A final numeric answer: an integer, `p/q` or a decimal, optionally signed; else None.

    Whitespace around the number and between its sign and digits is ignored; nothing else is.
    """
    s = "".join(text.split())
    sign = 1
    if s[:1] in ("-", "+", "−"):
        sign, s = (-1 if s[0] != "+" else 1), s[1:]
    if not s or len(s) > 2 * MAX_DIGITS + 1:
        return None
    for sep in ("/", "."):
        if s.count(sep) == 1:
            left, right = s.split(sep)
            if left and right and all(c in _DIGITS for c in left + right):
                if sep == "/":
                    return None if int(right) == 0 else sign * Fraction(int(left), int(right))
                return sign * Fraction(int(left + right), 10 ** len(right))
            return None
    if all(c in _DIGITS for c in s):
        return sign * Fraction(int(s))
    return None
