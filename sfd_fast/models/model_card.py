"""The model card (README.md) written into every generator folder, in the Hugging Face format.

YAML front matter (``library_name: diffusers``, ``pipeline_tag``, tags) and a Markdown body: how to
sample it (the call that reproduces the generator, with the one step and the guidance it needs),
what it was distilled from, what it forgets and what replaces it, the run's config and metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CARD_FILE = "README.md"
TAGS = ("sfd-fast", "score-forgetting-distillation", "one-step", "distillation", "machine-unlearning")


@dataclass(frozen=True)
class RunRecord:
    """What a run knows about itself that the folder's weights do not (all optional)."""

    teacher: str | None = None                 # the teacher's folder (or hub id) as given to the run
    forget: tuple[str, ...] = ()               # forgotten classes or prompts
    override: tuple[str, ...] = ()             # what replaces each, paired with ``forget``
    remain: tuple[str, ...] = ()               # remaining prompts (text runs)
    negative_prompt: str | None = None         # the CFG negative prompt of teacher and fake score
    config: dict | None = None                 # the run's SFDConfig (and options) as JSON-ready dicts
    metrics: dict | None = None                # the last logged training metrics, or evaluation metrics
    extra: dict = field(default_factory=dict)  # further facts shown in the card's table


@dataclass(frozen=True)
class ModelCard:
    title: str
    pipeline_tag: str        # "text-to-image" or "unconditional-image-generation" (class labels)
    summary: str
    usage: tuple[tuple[str, str], ...]  # (caption, Python snippet) pairs that sample the folder
    facts: dict              # rows of the "Model" table
    record: RunRecord = RunRecord()
    tags: tuple[str, ...] = TAGS

    def render(self) -> str:
        r = self.record
        lines = ["---", "library_name: diffusers", f"pipeline_tag: {self.pipeline_tag}", "tags:"]
        lines += [f"- {t}" for t in self.tags]
        lines += ["---", "", f"# {self.title}", "", self.summary, "", "## Use it"]
        for caption, code in self.usage:
            lines += ["", caption, "", "```python", code.strip(), "```"]
        lines += ["", "## Model", "", "| | |", "| --- | --- |"]
        facts = {**self.facts, **({"teacher": r.teacher} if r.teacher else {}), **r.extra}
        lines += [f"| {k} | {_cell(v)} |" for k, v in facts.items()]
        if r.forget:
            lines += ["", "## What it forgets", "", "| forgotten | generated instead |", "| --- | --- |"]
            overrides = list(r.override) + [""] * (len(r.forget) - len(r.override))
            lines += [f"| {_cell(f)} | {_cell(o)} |" for f, o in zip(r.forget, overrides)]
            if r.negative_prompt:
                lines += ["", "Negative prompt of teacher and fake score during distillation: "
                          f"{_cell(r.negative_prompt)}"]
            if r.remain:
                lines += ["", f"Remaining prompts ({len(r.remain)}): " + ", ".join(_cell(p) for p in r.remain)]
        for title, block in (("Metrics", r.metrics), ("Training config", r.config)):
            if block:
                lines += ["", f"## {title}", "", "```json", json.dumps(block, indent=2, sort_keys=True, default=str),
                          "```"]
        lines += ["", "Written by sfd_fast (Score Forgetting Distillation, SPEC section 3).", ""]
        return "\n".join(lines)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(self.render())
        return path


def _cell(value) -> str:
    """A value for one Markdown table cell (pipes escaped, newlines flattened)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["ModelCard", "RunRecord", "CARD_FILE"]
