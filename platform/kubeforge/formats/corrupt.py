"""Rejected answers for DPO on the built-in task: a function body changed so that it is wrong but still parses."""

from __future__ import annotations

import ast
import io
import itertools
import random
import tokenize
from collections.abc import Sequence

_SWAPS = {
    "==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">",
    "+": "-", "-": "+", "+=": "-=", "-=": "+=",
    "and": "or", "or": "and", "True": "False", "False": "True", "is": "is not", "in": "not in",
}


def corrupt_body(header: str, body: str, rng: random.Random) -> str:
    """A wrong copy of `body` that still reads like code: one comparison, operator, boolean or integer
    literal changed, one `return` stripped of its value, one statement dropped or two adjacent ones
    swapped. The edit is chosen by `rng` among those that keep the function parseable; a body with no
    such place (a lone `raise`) becomes `pass` (never equal to the body: stub bodies are not extracted)."""
    source = header + body
    body_start = len(header)
    edits = _candidate_edits(source, body_start) + _statement_edits(source, header.count("\n"))
    rng.shuffle(edits)
    for start, end, replacement in edits:
        changed = source[:start] + replacement + source[end:]
        if changed == source or not changed[body_start:].strip():
            continue
        try:
            ast.parse(changed)
        except (SyntaxError, ValueError):
            continue
        return changed[body_start:]
    first = next((line for line in body.split("\n") if line.strip()), "    pass")
    indent = first[: len(first) - len(first.lstrip())] or "    "
    return f"{indent}pass\n"


def _candidate_edits(source: str, body_start: int) -> list[tuple[int, int, str]]:
    """(start, end, replacement) character spans of `source`, all inside the body."""
    line_starts = [0]
    for line in source.split("\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)

    def offset(position: tuple[int, int]) -> int:
        return line_starts[position[0] - 1] + position[1]

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    edits: list[tuple[int, int, str]] = []
    for index, token in enumerate(tokens):
        start, end = offset(token.start), offset(token.end)
        if start < body_start:
            continue
        if token.type in (tokenize.OP, tokenize.NAME) and token.string in _SWAPS:
            following = tokens[index + 1].string if index + 1 < len(tokens) else ""
            if token.string == "is" and following == "not":
                continue  # `is not` -> `is not not` would not parse; `not in` fails the parse check below
            edits.append((start, end, _SWAPS[token.string]))
        elif token.type == tokenize.NUMBER and token.string.isdigit():
            edits.append((start, end, str(int(token.string) + 1)))
        elif token.type == tokenize.NAME and token.string == "return":
            value_end = _statement_value_end(tokens, index + 1)
            if value_end is not None:
                edits.append((end, offset(value_end), ""))
    return edits


def _statement_edits(source: str, header_lines: int) -> list[tuple[int, int, str]]:
    """Dropping one statement, or swapping two adjacent ones, of a block of the body: whole lines only,
    and only statements that have their lines to themselves."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    line_starts = [0]
    for line in lines:
        line_starts.append(line_starts[-1] + len(line) + 1)
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if not isinstance(block, list) or len(block) < 2 or not isinstance(block[0], ast.stmt):
                continue
            alone: list[ast.stmt] = []
            for index, statement in enumerate(block):
                assert statement.end_lineno is not None
                before = block[index - 1].end_lineno if index > 0 else None
                after = block[index + 1].lineno if index + 1 < len(block) else None
                if (
                    statement.lineno > header_lines
                    and (before is None or before < statement.lineno)
                    and (after is None or after > statement.end_lineno)
                ):
                    alone.append(statement)
                    edits.append((line_starts[statement.lineno - 1], line_starts[statement.end_lineno], ""))
            for first, second in itertools.pairwise(alone):
                if first.lineno == first.end_lineno and second.lineno == second.end_lineno == first.lineno + 1:
                    a, b = lines[first.lineno - 1], lines[second.lineno - 1]
                    if a.strip() != b.strip():
                        start, end = line_starts[first.lineno - 1], line_starts[second.lineno]
                        edits.append((start, end, f"{b}\n{a}\n"))
    return edits


def _statement_value_end(tokens: Sequence[tokenize.TokenInfo], first: int) -> tuple[int, int] | None:
    """End of the expression that starts at `tokens[first]` and runs to the end of its statement."""
    depth = 0
    last: tuple[int, int] | None = None
    for token in tokens[first:]:
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or (depth == 0 and token.string == ";"):
            break
        if token.type in (tokenize.COMMENT, tokenize.NL):
            continue
        if token.string in "([{" and token.type == tokenize.OP:
            depth += 1
        elif token.string in ")]}" and token.type == tokenize.OP:
            depth -= 1
        last = token.end
    return last
