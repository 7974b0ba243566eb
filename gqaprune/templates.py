"""Named prompt templates for fine-tuning: a record -> (prompt, response) pair.

Why named: the template decides what the model learns to answer, so runs that differ only in
the template must be told apart; the name and the exact strings are logged with every run.

Record forms (see ``gqaprune.finetune.detect_form``):
  * ``instruction`` (Alpaca): ``instruction``, optional ``input``, ``output``
  * ``qa`` (SQuAD): ``context``, ``question``, ``answer`` (first of ``answers`` when given)
  * ``text``: ``text`` (plain language modelling; no prompt, every token is a target)

The loss covers the response only (unless ``train_on_prompt``), so a template's prompt must
end exactly where the answer starts; responses that start a new word carry their leading
space (``" Paris"``) so the boundary is a token boundary in BPE vocabularies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from gqaprune.errors import UserError

FORMS = ("instruction", "qa", "text")

# The Stanford Alpaca prompts (also used by alpaca-lora and LLM-Pruner's recovery stage).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
QA_PROMPT = "{context}\nQuestion: {question}\nAnswer:"
QA_RESPONSE = " {answer}"


@dataclass(frozen=True)
class Template:
    name: str
    forms: tuple[str, ...]        # record forms this template accepts
    description: str
    prompt: str = ""              # format string over the record's fields
    prompt_no_input: str = ""     # alpaca: used when the record's input is empty
    response: str = "{output}"
    uses_chat_template: bool = False  # render with the tokenizer's own chat template

    @property
    def adds_special_tokens(self) -> bool:
        """Chat templates write BOS / end-of-turn themselves; the others get BOS ... EOS."""
        return not self.uses_chat_template

    def to_dict(self) -> dict:
        return asdict(self)


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("alpaca", ("instruction", "qa"),
             "Stanford Alpaca prompt; QA records become instruction=question, input=context",
             ALPACA_WITH_INPUT, ALPACA_NO_INPUT, "{output}"),
    Template("qa", ("qa",), "SQuAD-style reading comprehension: context, question, short answer",
             QA_PROMPT, QA_PROMPT, QA_RESPONSE),
    Template("chat", ("instruction", "qa"),
             "the tokenizer's chat template (Instruct models): one user turn, one assistant turn",
             uses_chat_template=True),
    Template("text", ("text",), "plain text, language-model loss on every token",
             "", "", "{text}"),
)}
AUTO = "auto"
DEFAULT_FOR_FORM = {"instruction": "alpaca", "qa": "qa", "text": "text"}


def get_template(name: str, form: str) -> Template:
    """The template ``name`` (``auto``: the default for ``form``), checked against the form."""
    if name == AUTO:
        name = DEFAULT_FOR_FORM[form]
    if name not in TEMPLATES:
        raise UserError(f"unknown template '{name}'",
                        f"use {AUTO} or one of {', '.join(sorted(TEMPLATES))}")
    tpl = TEMPLATES[name]
    if form not in tpl.forms:
        fits = sorted(n for n, t in TEMPLATES.items() if form in t.forms)
        raise UserError(f"template '{name}' does not fit {form}-form data",
                        f"use template {AUTO} or one of {', '.join(fits)}")
    return tpl


def as_instruction(record: dict, form: str) -> dict:
    """An instruction-form view of a record (QA: instruction=question, input=context)."""
    if form == "qa":
        return {"instruction": record["question"], "input": record["context"],
                "output": record["answer"]}
    return {"instruction": record["instruction"], "input": record.get("input") or "",
            "output": record["output"]}


def render(template: Template, record: dict, form: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) strings of one record; their concatenation is the training text."""
    if template.uses_chat_template:
        return _render_chat(tokenizer, as_instruction(record, form))
    if form == "text":
        return "", template.response.format(text=record["text"])
    if form == "qa" and template.name == "qa":
        return template.prompt.format(**record), template.response.format(**record)
    rec = as_instruction(record, form)
    prompt = template.prompt if rec["input"].strip() else template.prompt_no_input
    return prompt.format(**rec), template.response.format(**rec)


def _render_chat(tokenizer, rec: dict) -> tuple[str, str]:
    """Prompt = user turn + generation prompt; response = the rest of the two-turn chat."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("template 'chat' needs a tokenizer with a chat template (Instruct models)",
                        "use template alpaca for base models")
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"].strip() else "")
    turns = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": rec["output"]}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the tokenizer's chat template renders the assistant turn so that the "
                        "prompt is not a prefix of the conversation",
                        "use template alpaca, or a tokenizer whose chat template appends turns")
    return prompt, full[len(prompt):]
