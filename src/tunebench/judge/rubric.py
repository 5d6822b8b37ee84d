"""Judge prompts: ELYZA's 1–5 scale with reference and grading notes, or reference-free (TV set).

Prompts are plain text files with {input}, {output}, {reference}, {eval_aspect} slots; users can
pass their own with judge.prompt_file. Slots are filled by plain replacement (answers may hold
braces), and the prompt's hash is part of every cache key, so editing it re-judges everything.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path

from tunebench.errors import ConfigError

PROMPTS = Path(str(files("tunebench.judge").joinpath("prompts")))
SLOTS = ("{input}", "{output}", "{reference}", "{eval_aspect}")


def load_rubric(prompt_file: str | None, has_reference: bool) -> str:
    if prompt_file:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"judge.prompt_file {prompt_file}: not found") from None
        if "{input}" not in text or "{output}" not in text:
            raise ConfigError(f"{prompt_file}: a judge prompt needs the slots {{input}} and {{output}}")
        return text
    name = "elyza_reference.txt" if has_reference else "elyza_reference_free.txt"
    return (PROMPTS / name).read_text(encoding="utf-8")


def fill(rubric: str, input: str, output: str, reference: str | None = None, eval_aspect: str | None = None) -> str:
    values = {"{input}": input, "{output}": output, "{reference}": reference or "(なし)",
              "{eval_aspect}": eval_aspect or "(なし)"}
    return fill_slots(rubric, values)


def fill_slots(template: str, values: dict[str, str]) -> str:
    """Replace each `{slot}` named in `values`."""
    # Replace all slots in one pass so text inside an answer that looks like a slot stays as it is.
    out, i = [], 0
    while i < len(template):
        for slot, value in values.items():
            if template.startswith(slot, i):
                out.append(value)
                i += len(slot)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def text_hash(*parts: str | None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part or "").encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]
