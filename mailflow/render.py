"""Render one message (subject, HTML, text) from a trigger's Jinja2 templates.

Templates are data edited by marketers, not code: they run in Jinja2's immutable
sandbox (no Python internals, no mutation of the row's data) with
``StrictUndefined`` (a misspelt field is an error, not an empty string).
HTML parts are autoescaped; subject and text parts are not.

Template lookup
---------------
::

    templates/
      _layouts/base.html, base.txt      shared layouts, extended by the parts
      _layouts/i18n.txt                 the layouts' own words (footer) per language
      <template>/                       one folder per trigger, e.g. abandoned_cart
        <locale>/                       en, de, fr, pt_br ... (lower case, "_" not "-")
          subject.txt                   the parts of the default variant; every
          body.html                     locale folder should have all three
          body.txt                      (``Renderer.check`` reports a gap)
          <variant>.<part>              optional variant parts, e.g. vip.subject.txt
          _<name>.html / _<name>.txt    partials, free to include or extend

Each part (``subject.txt``, ``body.html``, ``body.txt``) is looked up on its own;
the first file that exists wins:

1. ``<locale>/<variant>.<part>``, then ``<locale>/<part>``;
2. the same for each shorter form of the locale (``de_at`` -> ``de``);
3. the same for the default locale.

Language beats variant: a German VIP customer gets the German default text when
there is no German VIP file, never the English VIP text. An unknown or malformed
locale falls back to the default locale; it is customer data and must not fail
the message.

What templates see
------------------
The row's context as given, plus ``locale``: the locale folder the part came
from (``money`` uses it for number formatting, the layouts for their words and
``<html lang>``). A key ``locale`` in the context is overridden. On a mapping,
``a.b`` reads the key ``b`` before any method of the same name, so
``cart.items`` is the cart's items, not ``dict.items``.

Templates are read once per ``Renderer``; make a new one to pick up edits.
"""

from __future__ import annotations

import contextvars
import os
import re
import string
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
    nodes,
    pass_context,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import do_format, do_replace
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailflow.errors import ConfigError, TemplateError

__all__ = ["PARTS", "RenderedMessage", "Renderer", "format_money"]

#: The parts of a message, in the order they are rendered.
PARTS: tuple[str, str, str] = ("subject.txt", "body.html", "body.txt")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_LOCALE_RE = re.compile(r"[a-z]{2,3}(?:_[a-z0-9]{2,8})*\Z")
_VARIANT_FILE_RE = re.compile(r"([a-z0-9][a-z0-9_-]*)\.(subject\.txt|body\.html|body\.txt)\Z")
_NO_ATTRIBUTE_RE = re.compile(r"'(.+)' has no attribute '(.+)'\Z")
# Runs of whitespace (newlines included) but not the no-break spaces money uses, and
# control characters (a NUL from customer data): a subject is one header line.
_SUBJECT_SPACE = re.compile(r"(?:[^\S\u00a0\u2007\u202f]|[\x00-\x1f\x7f-\x9f])+")
#: RFC 5322's line limit; SendGrid refuses a longer subject, so the message fails here,
#: named, instead of as a 400 from the API.
MAX_SUBJECT_CHARS = 998
# Bounds the resolution cache: its keys include the caller's raw locale, which is
# customer data and could take any number of values.
_MAX_RESOLVED = 4096
_MAX_DETAIL = 200

_FIX_UNDEFINED = (
    "check the field name against the trigger's context, "
    "or guard an optional field with `{% if x is defined %}`"
)
_FIX_SYNTAX = "fix the template on that line"
_FIX_NOT_FOUND = "fix the name in {% extends %}/{% include %}/{% import %} or create that file"
_FIX_SECURITY = "templates may read data fields only; remove the access to Python internals"
_FIX_OTHER = "check the expression on that line against the types of the data it uses"


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """One rendered message.

    ``locale`` and ``variant`` say which files the HTML body came from (after
    fallback), so the ledger can record what was actually sent.
    """

    subject: str
    html: str
    text: str
    locale: str
    variant: str | None


@dataclass(frozen=True, slots=True)
class _Part:
    template: Template
    name: str  # e.g. "abandoned_cart/de/vip.body.html"
    locale: str
    variant: str | None


#: The longest string or list a template may build with ``*`` or ``%`` (a message body
#: is far shorter; ``'a' * 10**9`` would take a gigabyte before anything could object).
MAX_TEMPLATE_VALUE_CHARS = 100_000
#: The largest exponent ``**`` may take (``9**9**9`` would compute for hours).
MAX_TEMPLATE_EXPONENT = 64
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?")


class _TooLarge(SecurityError):
    """A template asked for a value past the bounds above."""


# str methods and filters whose integer arguments are a width to pad or indent to.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDTH_FILTERS = ("center", "indent")


def _check_widths(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and value > MAX_TEMPLATE_VALUE_CHARS:
            raise _TooLarge(f"a width over {MAX_TEMPLATE_VALUE_CHARS} is not allowed")


def _bounded_filter(name: str, original: Any) -> Any:
    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_widths(args, kwargs)
        return original(value, *args, **kwargs)

    bounded.__name__ = name
    return bounded


def _check_format_widths(fmt: str) -> None:
    """Refuse a printf-style width or precision that would build a huge string."""
    for match in _FORMAT_WIDTH.finditer(fmt):
        for digits in match.groups():
            if digits and int(digits) > MAX_TEMPLATE_VALUE_CHARS:
                raise _TooLarge(f"a format width over {MAX_TEMPLATE_VALUE_CHARS} is not allowed")


#: Loop steps one rendered part may take, all ``for`` loops together (nested loops over
#: two 100,000-character strings would otherwise run 10**10 steps; a cart has dozens).
MAX_TEMPLATE_LOOP_STEPS = 100_000
_loop_steps: contextvars.ContextVar[list[int]] = contextvars.ContextVar("loop_steps")


def _counted(iterable: Any) -> Iterator[Any]:
    """Iterate a template's ``for`` loop, counting its steps (see the code generator)."""
    steps = _loop_steps.get(None)
    if steps is None:  # rendered outside Renderer (not in this project): a budget per loop
        steps = [MAX_TEMPLATE_LOOP_STEPS]
    for item in iterable:
        steps[0] -= 1
        if steps[0] < 0:
            raise _TooLarge(
                f"the loops took more than {MAX_TEMPLATE_LOOP_STEPS} steps, which is not allowed"
            )
        yield item


#: The filter every compiled ``for`` loop goes through (a name no template would pick).
_COUNTED = "_mailflow_loop_steps"


class _CountingCodeGenerator(CodeGenerator):
    """Compiles every ``for`` loop to iterate through :func:`_counted`, so the loop steps
    of one render are counted against :data:`MAX_TEMPLATE_LOOP_STEPS` (Jinja's sandbox
    bounds ``range`` but not loops over other values, nor loops inside loops)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # Before code generation, which collects the filters a template uses up front.
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)


def _check_format_spec_widths(fmt: str) -> bool:
    """Refuse ``'{:999999999}'.format(x)``: a str.format width or precision past the bound.

    Returns whether a field takes its width from an argument (``'{:{}}'``)."""
    nested = False
    for _, _, spec, _ in string.Formatter().parse(fmt):
        nested = nested or "{" in (spec or "")
        for digits in re.findall(r"\d+", spec or ""):
            if int(digits) > MAX_TEMPLATE_VALUE_CHARS:
                raise _TooLarge(f"a format width over {MAX_TEMPLATE_VALUE_CHARS} is not allowed")
    return nested


def _check_replace(value: Any, old: Any, new: Any, count: Any = None) -> None:
    """Refuse a replace whose result would pass the bound (``s|replace('x', s)``)."""
    text, old_s, new_s = str(value), str(old), str(new)
    hits = text.count(old_s) if old_s else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    if len(text) + hits * (len(new_s) - len(old_s)) > MAX_TEMPLATE_VALUE_CHARS:
        raise _TooLarge(
            f"a replace building more than {MAX_TEMPLATE_VALUE_CHARS} characters is not allowed"
        )


def _replace_filter(eval_ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> Any:
    """Jinja's ``replace`` filter with :func:`_check_replace` first."""
    _check_replace(value, old, new, count)
    return do_replace(eval_ctx, value, old, new, count)


_replace_filter.jinja_pass_arg = do_replace.jinja_pass_arg  # type: ignore[attr-defined]


class _MailEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with data keys winning over methods on mappings, and bounds on the
    operators that can exhaust memory or CPU from a short template (Jinja's sandbox
    limits ``range`` but not these)."""

    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = _CountingCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if (
            operator == "**"
            and isinstance(right, int | float)
            and abs(right) > MAX_TEMPLATE_EXPONENT
        ):
            raise _TooLarge(f"an exponent over {MAX_TEMPLATE_EXPONENT} is not allowed")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(count, int)
                    and len(seq) * count > MAX_TEMPLATE_VALUE_CHARS
                ):
                    raise _TooLarge(
                        f"repeating a value past {MAX_TEMPLATE_VALUE_CHARS} characters or "
                        "items is not allowed"
                    )
        if operator == "%" and isinstance(left, str):
            _check_format_widths(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # str.center(10**9) and friends: a width argument builds the string up front.
        # str.format arrives wrapped by the sandbox (``__wrapped__`` is the str method).
        method = getattr(__obj, "__wrapped__", __obj)
        if isinstance(getattr(method, "__self__", None), str):
            if method.__name__ in _WIDTH_METHODS:
                _check_widths(args, kwargs)
            elif method.__name__ == "replace":
                _check_replace(method.__self__, *args, **kwargs)
            elif method.__name__ in ("format", "format_map") and _check_format_spec_widths(
                method.__self__
            ):
                _check_widths(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Plain Jinja tries attributes first, so `cart.items` would be the bound
        # method dict.items. A key's value is exactly what `cart["items"]` returns
        # in the sandbox anyway, so this is no less safe, and it is faster.
        if type(obj) is dict or isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # Jinja chains each template's globals to the environment's (a ChainMap), so a
        # later change to ``env.globals`` shows everywhere; every render then copies the
        # chain into a new context, and iterating a ChainMap was a tenth of a message's
        # render time. The environment's globals are never changed after it is built, so
        # a plain dict says the same, faster.
        return {**self.globals, **(d or {})}


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    """Jinja's ``format`` filter with :func:`_check_format_widths` first (the result stays
    ``Markup`` when the value is, as with Jinja's own)."""
    _check_format_widths(str(value))
    return do_format(value, *args, **kwargs)


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(".html")


class Renderer:
    """Renders the templates of one templates folder; safe to share between threads.

    Args:
        templates_dir: the folder holding ``_layouts/`` and one folder per template.
        default_locale: the locale used when the requested one has no files.

    Raises:
        ConfigError: the folder does not exist or the default locale is malformed.
    """

    def __init__(self, templates_dir: Path, *, default_locale: str = "en") -> None:
        self._dir = Path(templates_dir)
        if not self._dir.is_dir():
            raise ConfigError(
                f"templates folder {str(self._dir)!r} does not exist; "
                "set MAILFLOW_TEMPLATES_DIR to the folder holding the templates"
            )
        default = _normalize_locale(default_locale)
        if default is None:
            raise ConfigError(
                f"default locale {default_locale!r} is not a locale; use a folder name like 'en'"
            )
        self.default_locale = default
        self._root = os.path.normpath(os.fspath(self._dir))
        self._label = self._dir.name or "templates"
        self._env = _MailEnvironment(
            loader=FileSystemLoader(self._dir),
            undefined=StrictUndefined,
            autoescape=_autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # no stat() per render; a Renderer reads templates once
            cache_size=-1,  # bounded by the number of template files
        )
        self._env.filters["money"] = _money_filter
        self._env.filters["format"] = _format_filter
        self._env.filters["replace"] = _replace_filter
        self._env.filters[_COUNTED] = _counted
        for name in _WIDTH_FILTERS:
            self._env.filters[name] = _bounded_filter(name, self._env.filters[name])
        self._resolved: dict[tuple[str, str | None, str | None], tuple[_Part, _Part, _Part]] = {}
        self._folders: dict[str, dict[str, frozenset[str]]] = {}
        self._sources: dict[str, list[str]] = {}

    # -- rendering ---------------------------------------------------------------

    def render(
        self,
        template: str,
        context: Mapping[str, Any],
        *,
        locale: str | None = None,
        variant: str | None = None,
    ) -> RenderedMessage:
        """Render the subject, HTML and text of ``template`` for one row.

        Args:
            template: the template folder's name, e.g. ``"abandoned_cart"``.
            context: the row's data; never modified.
            locale: the customer's locale (``"de"``, ``"de-AT"``); None means default.
            variant: e.g. ``"vip"``; None (or no such file) means the default variant.

        Raises:
            TemplateError: a file is missing or broken, the row lacks a field the
                template uses, the template breaks the sandbox, or the subject is
                empty. The message names the file, the line when known and the fix.
        """
        parts = self._resolved.get((template, locale, variant))
        if parts is None:
            parts = self._resolve(template, locale, variant)
        subject_part, html_part, text_part = parts
        subject = _SUBJECT_SPACE.sub(" ", self._render_part(subject_part, context)).strip()
        if not subject:
            raise TemplateError(
                f"{self._display(subject_part.name)}: the subject is empty after rendering"
                " — make it produce text for every row (e.g. a fallback for empty fields)"
            )
        if len(subject) > MAX_SUBJECT_CHARS:
            raise TemplateError(
                f"{self._display(subject_part.name)}: the subject is {len(subject)} characters "
                f"after rendering, over the {MAX_SUBJECT_CHARS} allowed — shorten the template "
                "or the fields it shows"
            )
        return RenderedMessage(
            subject=subject,
            html=self._render_part(html_part, context),
            text=self._render_part(text_part, context),
            locale=html_part.locale,
            variant=html_part.variant,
        )

    def _render_part(self, part: _Part, context: Mapping[str, Any]) -> str:
        token = _loop_steps.set([MAX_TEMPLATE_LOOP_STEPS])
        try:
            return part.template.render(context, locale=part.locale)
        except Exception as exc:
            # `from None`: the original traceback may carry the row's values.
            raise self._error(exc, part.name) from None
        finally:
            _loop_steps.reset(token)

    def _resolve(
        self, template: str, locale: str | None, variant: str | None
    ) -> tuple[_Part, _Part, _Part]:
        if not _NAME_RE.match(template):
            raise TemplateError(
                f"template name {template!r} is not valid — use lower-case letters, digits, "
                "'_' and '-', as in the folder's name"
            )
        variant = variant or None  # "" from a segment rule means the default variant
        if variant is not None and not _NAME_RE.match(variant):
            raise TemplateError(
                f"variant {variant!r} of template {template!r} is not valid — use lower-case "
                "letters, digits, '_' and '-', as in the file names (vip.body.html)"
            )
        folders = self._folders.get(template)
        if folders is None:
            folders = self._scan(template)
            self._folders[template] = folders
        chain = self._locale_chain(locale, folders)
        found: list[_Part] = []
        for part in PARTS:
            hit = _find_part(part, chain, folders, variant)
            if hit is None:
                raise TemplateError(
                    f"{self._label}/{template}/{self.default_locale}/{part} is missing — every "
                    f"template needs subject.txt, body.html and body.txt in its default locale "
                    f"folder {self.default_locale!r}"
                )
            loc, file_name, file_variant = hit
            name = f"{template}/{loc}/{file_name}"
            try:
                compiled = self._env.get_template(name)
            except Exception as exc:
                raise self._error(exc, name) from None
            found.append(_Part(compiled, name, loc, file_variant))
        parts = (found[0], found[1], found[2])
        if len(self._resolved) >= _MAX_RESOLVED:
            self._resolved.clear()
        self._resolved[(template, locale, variant)] = parts
        return parts

    def _scan(self, template: str) -> dict[str, frozenset[str]]:
        """Map each locale folder of ``template`` to the file names in it."""
        folder = self._dir / template
        if not folder.is_dir():
            raise TemplateError(
                f"there is no template folder {self._label}/{template}/ — create it with "
                f"{self.default_locale}/subject.txt, body.html and body.txt, "
                "or fix the trigger's template name"
            )
        found: dict[str, frozenset[str]] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir() and _LOCALE_RE.match(entry.name):
                    with os.scandir(entry.path) as files:
                        found[entry.name] = frozenset(f.name for f in files if f.is_file())
        return found

    def _locale_chain(self, locale: str | None, folders: Mapping[str, object]) -> list[str]:
        chain: list[str] = []
        wanted = _normalize_locale(locale) if locale else None
        if wanted is not None:
            pieces = wanted.split("_")
            for n in range(len(pieces), 0, -1):
                candidate = "_".join(pieces[:n])
                if candidate in folders and candidate not in chain:
                    chain.append(candidate)
        if self.default_locale in folders and self.default_locale not in chain:
            chain.append(self.default_locale)
        return chain

    # -- checking ------------------------------------------------------------------

    def check(self, template: str, *, sample: Mapping[str, Any] | None = None) -> None:
        """Compile every file of ``template`` (and the layouts it uses) now.

        Meant for the start of a flow, so a broken template is reported once,
        up front, instead of failing every message. It also reports a locale
        folder that lacks a part, a file name that is not a part, and a
        reference to a template that does not exist. With ``sample`` (one row's
        context) it also renders every locale and variant with that row.

        Raises:
            TemplateError: listing every problem, one per line, each naming the
                file, the line when known, the problem and the fix.
        """
        if not _NAME_RE.match(template):
            raise TemplateError(
                f"template name {template!r} is not valid — use lower-case letters, digits, "
                "'_' and '-', as in the folder's name"
            )
        # Read the folder afresh: check() is the moment to see the current files.
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != template}
        self._folders.pop(template, None)
        folders = self._scan(template)
        self._folders[template] = folders
        problems: list[str] = []
        variants: set[str] = set()
        if self.default_locale not in folders:
            problems.append(
                f"{self._label}/{template}/{self.default_locale}/ is missing — the default "
                "locale's folder must hold subject.txt, body.html and body.txt"
            )
        for loc in sorted(folders):
            files = folders[loc]
            lacking = [p for p in PARTS if p not in files]
            if lacking:
                problems.append(
                    f"{self._label}/{template}/{loc}/ lacks {', '.join(lacking)} — add it, "
                    f"or readers in {loc!r} get that part from another locale"
                )
            for file_name in sorted(files):
                if file_name in PARTS or file_name.startswith(("_", ".")):
                    continue
                match = _VARIANT_FILE_RE.match(file_name)
                if match:
                    variants.add(match.group(1))
                elif file_name.endswith((".html", ".txt")):
                    problems.append(
                        f"{self._label}/{template}/{loc}/{file_name}: not a part name, so it is "
                        "never used — name it subject.txt, body.html, body.txt, "
                        "<variant>.<part>, or start a partial's name with '_'"
                    )
        for entry in sorted(Path(self._dir / template).iterdir()):
            if entry.is_dir() and entry.name not in folders and not entry.name.startswith("_"):
                problems.append(
                    f"{self._label}/{template}/{entry.name}/: not a locale folder name, so it "
                    "is never used — name it like 'de' or 'pt_br', or start it with '_'"
                )
        problems.extend(self._compile_all(template))
        if sample is not None and not problems:
            for loc in sorted(folders):
                for variant in [None, *sorted(variants)]:
                    try:
                        self.render(template, sample, locale=loc, variant=variant)
                    except TemplateError as exc:
                        if str(exc) not in problems:
                            problems.append(str(exc))
        if problems:
            count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
            raise TemplateError(
                f"template {template!r} has {count}:\n" + "\n".join(f"  {p}" for p in problems)
            )

    def _compile_all(self, template: str) -> list[str]:
        """Compile the files under the template's folder and what they reference."""
        problems: list[str] = []
        root = self._dir / template
        queue: list[tuple[str, str | None, int | None]] = [
            (path.relative_to(self._dir).as_posix(), None, None)
            for path in sorted(root.rglob("*"), reverse=True)
            if path.is_file() and path.suffix in (".html", ".txt")
        ]
        seen: set[str] = set()
        loader = self._env.loader
        assert loader is not None
        while queue:
            name, referrer, ref_line = queue.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                source, filename, _ = loader.get_source(self._env, name)
            except TemplateNotFound:
                where = self._display(referrer or name)
                line = f" line {ref_line}" if ref_line else ""
                problems.append(
                    f"{where}{line}: the template {name!r} does not exist — {_FIX_NOT_FOUND}"
                )
                continue
            try:
                tree = self._env.parse(source, name, filename)
                self._env.get_template(name)  # codegen finds unknown filters and tests
            except Exception as exc:
                problems.append(str(self._error(exc, name)))
                continue
            for node in tree.find_all(
                (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
            ):
                if isinstance(node, nodes.Include) and node.ignore_missing:
                    continue
                target = getattr(node, "template", None)  # all four node types have it
                if isinstance(target, nodes.Const) and isinstance(target.value, str):
                    queue.append((target.value, name, node.lineno))
        return problems

    # -- errors ----------------------------------------------------------------------

    def _display(self, name: str) -> str:
        return f"{self._label}/{name}"

    def _error(self, exc: BaseException, fallback: str) -> TemplateError:
        """Turn any failure inside Jinja into a TemplateError that names file and line."""
        name, line = self._locate(exc.__traceback__) or (fallback, None)
        if isinstance(exc, TemplateSyntaxError):  # includes unknown filters/tests
            name = exc.name or name
            line = exc.lineno
            problem, fix = exc.message or "syntax error", _FIX_SYNTAX
        elif isinstance(exc, TemplateNotFound):
            problem, fix = f"the template {exc.name!r} does not exist", _FIX_NOT_FOUND
        elif isinstance(exc, _TooLarge):
            problem, fix = _clip(str(exc)), "keep computed values small (README, input limits)"
        elif isinstance(exc, SecurityError):
            problem, fix = _clip(str(exc)), _FIX_SECURITY
        elif isinstance(exc, UndefinedError):
            problem, fix = self._undefined_problem(str(exc), name, line), _FIX_UNDEFINED
        elif isinstance(exc, ValueError):  # the filters' own messages say enough
            problem, fix = _clip(str(exc)), _FIX_OTHER
        else:
            problem, fix = f"{type(exc).__name__}: {_clip(str(exc))}", _FIX_OTHER
        where = self._display(name) + (f" line {line}" if line else "")
        return TemplateError(f"{where}: {problem.rstrip('.')} — {fix}")

    def _locate(self, tb: TracebackType | None) -> tuple[str, int] | None:
        """The innermost template frame: Jinja rewrites tracebacks to template lines."""
        prefix = self._root + os.sep
        found: tuple[str, int] | None = None
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename.startswith(prefix):
                name = os.path.relpath(filename, self._root).replace(os.sep, "/")
                found = (name, tb.tb_lineno)
            tb = tb.tb_next
        return found

    def _undefined_problem(self, message: str, name: str, line: int | None) -> str:
        """Name the field path (``'cart' has no attribute 'totl'``), not just its type."""
        match = _NO_ATTRIBUTE_RE.match(message)
        if match is None or line is None:
            return _clip(message)
        owner, attribute = match.groups()
        source = self._source_line(name, line)
        escaped = re.escape(attribute)
        path = re.search(
            rf"([A-Za-z_][\w.]*)\s*(?:\.\s*{escaped}\b|\[\s*['\"]{escaped}['\"]\s*\])", source
        )
        if path is None:
            return _clip(message)
        what = "" if owner == "dict object" else f" (it is {owner})"
        return f"{path.group(1)!r}{what} has no attribute {attribute!r}"

    def _source_line(self, name: str, line: int) -> str:
        lines = self._sources.get(name)
        if lines is None:
            try:
                assert self._env.loader is not None
                lines = self._env.loader.get_source(self._env, name)[0].splitlines()
            except TemplateNotFound:
                lines = []
            self._sources[name] = lines
        return lines[line - 1] if 0 < line <= len(lines) else ""


def _find_part(
    part: str, chain: list[str], folders: Mapping[str, frozenset[str]], variant: str | None
) -> tuple[str, str, str | None] | None:
    for loc in chain:
        files = folders[loc]
        if variant is not None and f"{variant}.{part}" in files:
            return loc, f"{variant}.{part}", variant
        if part in files:
            return loc, part, None
    return None


def _normalize_locale(locale: str | None) -> str | None:
    """``"de-AT"`` -> ``"de_at"``; None when it is not a well-formed locale."""
    if not locale:
        return None
    normalized = locale.strip().lower().replace("-", "_")
    return normalized if _LOCALE_RE.match(normalized) else None


def _clip(text: str) -> str:
    """First line, bounded: an error message must never carry a whole row."""
    first = text.strip().splitlines()[0] if text.strip() else "(no detail)"
    return first if len(first) <= _MAX_DETAIL else first[: _MAX_DETAIL - 1] + "…"


# -- money -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _MoneyStyle:
    decimal: str
    group: str
    min_grouping: int  # integer digits needed before grouping starts, minus 3 (CLDR)
    symbol_first: bool
    symbols: Mapping[str, str]


_NBSP = "\u00a0"
# From CLDR, for the languages and currencies the shop uses; other currencies show
# their ISO code. Add a row here rather than a dependency.
_MONEY_STYLES: dict[str, _MoneyStyle] = {
    "en": _MoneyStyle(".", ",", 1, True, {"USD": "$", "EUR": "€", "GBP": "£"}),
    "de": _MoneyStyle(",", ".", 1, False, {"USD": "$", "EUR": "€", "GBP": "£"}),
    "fr": _MoneyStyle(",", "\u202f", 1, False, {"USD": "$US", "EUR": "€", "GBP": "£GB"}),
    "es": _MoneyStyle(",", ".", 2, False, {"USD": "US$", "EUR": "€", "GBP": "GBP"}),
}
_ZERO_DECIMAL = frozenset({"JPY", "KRW", "CLP", "ISK", "VND"})
_CENTS = Decimal("0.01")
_UNITS = Decimal("1")


def format_money(
    amount: str | int | float | Decimal, currency: str = "USD", locale: str | None = None
) -> str:
    """Format an amount for a reader of ``locale``: ``$1,234.50``, ``1.234,50 €`` (de).

    Rounds half up to the currency's minor unit. Unknown locales format as
    English; unknown currencies show their ISO code (``CHF 12.00``).

    Raises:
        ValueError: the amount is not a finite number or the currency is empty.
    """
    value = _to_decimal(amount)
    code = currency.strip().upper() if isinstance(currency, str) else ""
    if not code:
        raise ValueError(f"money: currency {currency!r} is empty — pass an ISO code like 'USD'")
    style = _money_style(locale)
    quantum = _UNITS if code in _ZERO_DECIMAL else _CENTS
    rounded = value.quantize(quantum, rounding=ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    digits = f"{abs(rounded):f}"
    whole, _, fraction = digits.partition(".")
    if len(whole) >= 3 + style.min_grouping:
        head = len(whole) % 3 or 3
        groups = [whole[:head]] + [whole[i : i + 3] for i in range(head, len(whole), 3)]
        whole = style.group.join(groups)
    number = f"{whole}{style.decimal}{fraction}" if fraction else whole
    symbol = style.symbols.get(code, code)
    if style.symbol_first:
        gap = _NBSP if symbol[-1].isalpha() else ""
        return f"{sign}{symbol}{gap}{number}"
    return f"{sign}{number}{_NBSP}{symbol}"


@lru_cache(maxsize=256)
def _money_style(locale: str | None) -> _MoneyStyle:
    language = (_normalize_locale(locale) or "en").split("_")[0]
    return _MONEY_STYLES.get(language, _MONEY_STYLES["en"])


def _to_decimal(amount: object) -> Decimal:
    if isinstance(amount, Decimal):
        value = amount
    elif isinstance(amount, bool):
        raise ValueError("money: got a true/false value, not an amount — pass a number")
    elif isinstance(amount, int):
        value = Decimal(amount)
    elif isinstance(amount, float):
        value = Decimal(repr(amount))  # 0.1 -> 0.1, not 0.1000000000000000055...
    elif isinstance(amount, str):
        try:
            value = Decimal(amount.strip())
        except InvalidOperation:
            raise ValueError(
                f"money: {_clip(repr(amount))[:40]} is not an amount — "
                "pass a number or a numeric string like '84.50'"
            ) from None
    else:
        raise ValueError(
            f"money: got a {type(amount).__name__}, not an amount — "
            "pass a number or a numeric string like '84.50'"
        )
    if not value.is_finite():
        raise ValueError(f"money: {amount!r} is not a finite amount")
    return value


@pass_context
def _money_filter(
    context: Context,
    amount: str | int | float | Decimal,
    currency: str = "USD",
    locale: str | None = None,
) -> str:
    """``{{ cart.total | money(cart.currency) }}``, in the part's locale unless given."""
    for value in (amount, currency, locale):
        if isinstance(value, Undefined):
            str(value)  # StrictUndefined raises here, naming the missing field
    if locale is None:
        found = context.get("locale")
        locale = found if isinstance(found, str) else None
    if type(amount) in _CACHEABLE and type(currency) is str and type(locale) in _LOCALE_TYPES:
        return _format_money_cached(amount, currency, locale)
    return format_money(amount, currency, locale)


# A shop's prices repeat, and a message shows several: formatted once per amount,
# currency and locale. ``typed``: True == 1 as a key, but True must still be refused.
_format_money_cached = lru_cache(maxsize=4096, typed=True)(format_money)
_CACHEABLE = frozenset({str, int, float, Decimal})
_LOCALE_TYPES = frozenset({str, type(None)})
