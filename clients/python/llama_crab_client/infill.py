"""Fill in the middle: a completion prompt made of the code around the cursor."""

from __future__ import annotations

from dataclasses import dataclass

from .types import LIMITS, FieldViolation

__all__ = ["Infill", "InfillFile"]

# Other files sent as context: enough for an editor's open tabs, bounded in cost.
MAX_EXTRA_FILES = 64
MAX_INDENT = 1024


@dataclass(frozen=True)
class InfillFile:
    """Another file of the project, given as context before the prefix."""

    filename: str
    text: str


@dataclass(frozen=True)
class Infill:
    """Generate what goes between `prefix` and `suffix` (a code model's FIM tokens build
    the prompt; a model without them refuses). `prompt` is text the middle starts with;
    `extra` files and `filename` give the model the project around the cursor."""

    prefix: str
    suffix: str = ""
    prompt: str = ""
    extra: tuple[InfillFile, ...] = ()
    filename: str = ""
    # The middle ends before a line (after its first) indented less than this many spaces
    # or tabs, a blank line included: the cursor's block is done (llama.cpp's `n_indent`).
    # 0: off, the model's end token or max_tokens ends it.
    indent: int = 0

    def violations(self) -> list[FieldViolation]:
        problems: list[FieldViolation] = []
        texts = [("infill.prefix", self.prefix), ("infill.suffix", self.suffix), ("infill.prompt", self.prompt),
                 ("infill.filename", self.filename)]  # fmt: skip
        if len(self.extra) > MAX_EXTRA_FILES:
            problems.append(FieldViolation("infill.extra", f"at most {MAX_EXTRA_FILES} files (got {len(self.extra)})"))
        else:
            for i, f in enumerate(self.extra):
                texts.append((f"infill.extra[{i}].filename", f.filename))
                texts.append((f"infill.extra[{i}].text", f.text))
        if not isinstance(self.indent, int) or isinstance(self.indent, bool) or not 0 <= self.indent <= MAX_INDENT:
            problems.append(FieldViolation("infill.indent", f"must be an integer in [0, {MAX_INDENT}]"))
        total = 0
        for field, text in texts:
            if not isinstance(text, str):
                problems.append(FieldViolation(field, "must be text"))
                continue
            total += len(text.encode("utf-8"))
        if total > LIMITS.prompt_text_bytes:
            problems.append(FieldViolation("infill", f"at most {LIMITS.prompt_text_bytes} bytes of text in all"))
        if not problems and not (self.prefix or self.suffix or self.prompt):
            problems.append(FieldViolation("infill.prefix", "prefix, suffix and prompt are all empty"))
        return problems
