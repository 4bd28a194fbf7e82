"""Rendering a model's jinja chat template the way transformers does.

Templates come from model files, i.e. from strangers, so they run in jinja's immutable sandbox and
only see plain JSON data. The environment (trim_blocks, lstrip_blocks, ``raise_exception``,
``strftime_now``, a non-escaping ``tojson``, loop controls) matches transformers', because
templates are written and tested against it: any difference changes the prompt the model sees.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from engine.errors import InvalidRequestError

_ROLES_NEEDING_CONTENT = frozenset({"system", "user"})


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """A compiled `jinja2.Template` (cached: the router renders the same template for every request)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        # `{% generation %}` marks assistant spans for training masks; for serving it renders its body.
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None,
        separators: tuple[str, str] | None = None, sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise InvalidRequestError(f"chat template does not compile: {e}") from e


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated plain-data copies of OpenAI-style messages; raises `InvalidRequestError`.

    Content given as a list of text parts is joined into one string with newlines (as vLLM does for
    string-content templates), since the models we serve are text-only and most templates
    concatenate ``message['content']``.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequestError("messages: must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}]: must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role: must be a non-empty string")
        clean = {str(k): _plain(v, f"messages[{i}].{k}") for k, v in message.items()}
        content = clean.get("content")
        if isinstance(content, list):
            clean["content"] = _join_text_parts(content, i)
        elif content is None:
            if role in _ROLES_NEEDING_CONTENT:
                raise InvalidRequestError(f"messages[{i}].content: required for role {role!r}")
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content: must be a string or a list of text parts")
        out.append(clean)
    return out


def _join_text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif _is_text_part(part):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}"
            )
    return "\n".join(texts)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)


def _plain(value: Any, where: str) -> Any:
    """Rebuild request data from JSON types only, so nothing with methods reaches the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{n}]") for n, v in enumerate(value)]
    # subclasses (str/int enums, numpy scalars) carry methods of their own: strip to the base type
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise InvalidRequestError(f"{where}: unsupported value of type {type(value).__name__}")


def render(
    source: str,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt text; template errors (``raise_exception``, a missing key) become `InvalidRequestError`."""
    import jinja2

    template = compile_template(source)
    context = {
        **(special_tokens or {}),
        **{k: _plain(v, k) for k, v in kwargs.items()},
        "messages": normalize_messages(messages),
        "tools": _plain(tools, "tools"),
        "documents": _plain(documents, "documents"),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(**context)
    except jinja2.exceptions.TemplateError as e:  # includes raise_exception(...) and UndefinedError
        raise InvalidRequestError(f"chat template rejected the messages: {e}") from e
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as e:
        raise InvalidRequestError(f"chat template failed on the messages: {e!r}") from e
