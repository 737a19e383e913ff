"""configs/base.yaml, written from pipeline/config.py: every field with its default and the comment above it there.

The field comments in pipeline/config.py are the one place a field is documented; ``(results)`` marks the fields that
change transcripts (:func:`config_fingerprint_fields`). ``python -m tests.config_yaml`` rewrites configs/base.yaml;
tests/unit/test_config.py checks that the shipped file is this text.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import yaml

from whisper_batch.pipeline import config

BASE_YAML = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
HEADER = """\
# whisper-batch: every config field with its default. Copy this file and edit, or override one field with
#   whisper-batch run INPUT -o OUTPUT --config configs/base.yaml --set decode.beam_size=5
# Unknown keys are errors. Fields marked (results) change transcripts: a resume with different values is refused.
# Written from the field comments in pipeline/config.py by `python -m tests.config_yaml`: edit them there.
"""


def field_comments() -> dict[str, dict[str, list[str]]]:
    """Per config dataclass, per field: the lines of the comment right above it in pipeline/config.py, without
    their ``# ``."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    out: dict[str, dict[str, list[str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                comment, i = [], stmt.lineno - 2
                while i >= 0 and lines[i].lstrip().startswith("#"):
                    text = lines[i].lstrip()[1:]
                    comment.insert(0, text[1:] if text.startswith(" ") else text)
                    i -= 1
                fields[stmt.target.id] = comment
    return out


def yaml_value(value: Any) -> str:
    """``value`` as YAML flow text: null, true, 30.0, auto, "-1" (quoted only where plain text would read as
    another value), [a, b], {k: v}."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value and yaml.safe_load(value) == value else json.dumps(value)
    return repr(value)


def base_yaml() -> str:
    """The text of configs/base.yaml.

    Raises:
        ValueError: a field of pipeline/config.py has no comment above it.
    """
    comments = field_comments()
    results = set(config.config_fingerprint_fields(config.RunConfig()))
    parts = [HEADER]
    for section, values in config.config_to_dict(config.RunConfig()).items():
        whole = all(f"{section}.{key}" in results for key in values)  # said once for the section
        lines = [f"# every {section} field is (results)"] if whole else []
        lines.append(f"{section}:")
        for key, value in values.items():
            comment = list(comments[config.SECTIONS[section].__name__][key])
            if not comment:
                raise ValueError(f"{section}.{key} has no comment above it in pipeline/config.py")
            if f"{section}.{key}" in results and not whole:
                comment[0] = f"(results) {comment[0]}"
            lines += [f"  # {line}".rstrip() for line in comment]
            lines.append(f"  {key}: {yaml_value(value)}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    BASE_YAML.write_text(base_yaml(), encoding="utf-8")
    print(f"wrote {BASE_YAML}")
