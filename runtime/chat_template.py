"""Chat templates: Hugging Face's jinja2 dialect, rendered in a sandbox whose work is bounded.

A chat template comes from the model file, so it is untrusted code. jinja2's
`ImmutableSandboxedEnvironment` stops it from reaching Python internals, but not from running
away: nested ``range(100000)`` loops, ``10 ** 10000000`` or ``'x' * 10**9`` hang or allocate
without limit. `render` bounds every render by `TemplateLimits`:

- steps: every loop iteration, call (functions, macros, methods), filter and guarded operator is
  one step; past ``max_steps`` or ``max_seconds`` of wall time the render stops. Loops are
  counted by rewriting each ``{% for %}``'s iterable into a counting wrapper before compiling
  (jinja2 offers no hook on iteration; its sandbox does offer `call` and `call_binop`).
- sizes: any one string, list or int a step makes is checked *before* it is made where one
  operation can amplify (``*``, ``**``, ``+``, ``%`` formatting, ``str.format`` widths,
  ``center``/``ljust``/``replace``/``join``-style methods and filters, ``str()`` of containers
  that repeat one big value), and every value made is added to a running total.
  Both limits grow with the size of the input messages, so a long conversation is never
  refused for being long.
- ``range`` is capped at ``max_range`` items (jinja's own sandbox cap).

A violated limit raises `ChatTemplateError` (a ValueError) saying which; so does anything else that
stops a render (the template's own ``raise_exception``, a sandbox violation, a TypeError in its
code), one line with the original as its cause. Templates that stay in
bounds render exactly as transformers renders them (same environment options, the same helpers:
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII, ``{% generation %}``).
`check_messages` validates the messages first, so a missing ``content`` is a clear ValueError
naming the message rather than jinja's UndefinedError from inside the template.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2


class ChatTemplateError(ValueError, jinja2.TemplateError):
    """A chat template (or its messages) that genfuse refuses to render, or that failed while
    rendering (its own ``raise_exception``, a sandbox violation, a bug in the template): the
    message says why. A ValueError for callers, and still a jinja2.TemplateError."""


@dataclass(frozen=True)
class TemplateLimits:
    max_steps: int = 1_000_000  # a 10k-message conversation takes ~100k
    max_seconds: float = 2.0  # real templates render in well under a millisecond per message
    max_chars: int = 1 << 24  # any one string, and the output, plus 2x the input's characters
    max_items: int = 1 << 20  # any one list/tuple/dict; filters walk them in Python at ~1 us an item
    max_total: int = 1 << 26  # everything made while rendering, plus 16x the input's characters
    max_range: int = 100_000
    max_int_bits: int = 1 << 16  # ints made by * and **: 19k digits (Python prints at most 4300)
    max_template_chars: int = 1 << 20  # the source; the largest real templates are ~30 KB


DEFAULT_LIMITS = TemplateLimits()
_RESERVED = "__genfuse_"  # names of the guards the rewritten template calls; refused in sources
_ITER, _OUT, _CONCAT = _RESERVED + "iter", _RESERVED + "out", _RESERVED + "concat"


# --------------------------------------------------------------------------- messages


def check_messages(messages: Any) -> list:
    """``messages`` as a list, or ChatTemplateError naming the first bad message: each must be a
    dict with a string ``role`` and a string ``content`` (or a list of typed content parts; or no
    content at all on an assistant message that carries ``tool_calls``)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}] has no 'role'" if role is None else
                                    f"messages[{i}]['role'] must be a string, got {type(role).__name__}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if content is None:
            if m.get("tool_calls"):
                continue
            raise ChatTemplateError(f"messages[{i}] ({role}) has no 'content'")
        if isinstance(content, list) and all(isinstance(p, Mapping) and isinstance(p.get("type"), str)
                                             for p in content):
            continue
        raise ChatTemplateError(f"messages[{i}]['content'] must be a string (or a list of "
                                f"{{'type': ...}} parts), got {type(content).__name__}")
    return list(messages)


# --------------------------------------------------------------------------- the budget


class _Budget:
    __slots__ = ("limits", "deadline", "steps", "total", "max_chars", "max_items", "max_total")

    def __init__(self, limits: TemplateLimits, input_chars: int):
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.steps = self.total = 0
        self.max_chars = limits.max_chars + 2 * input_chars
        self.max_items = limits.max_items + input_chars
        self.max_total = limits.max_total + 16 * input_chars


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("genfuse_chat_template", default=None)


def _limits() -> tuple[int, int, TemplateLimits]:
    """(max chars of one string, max items of one container, limits) for the render in progress;
    the defaults outside one (jinja2 folds constant expressions at compile time, through the
    same guards)."""
    b = _BUDGET.get()
    if b is None:
        return DEFAULT_LIMITS.max_chars, DEFAULT_LIMITS.max_items, DEFAULT_LIMITS
    return b.max_chars, b.max_items, b.limits


def _step() -> None:
    b = _BUDGET.get()
    if b is None:
        return
    b.steps += 1
    if b.steps > b.limits.max_steps:
        raise ChatTemplateError(f"chat template took more than {b.limits.max_steps} steps (loop iterations "
                                "and calls); refusing to render it")
    if time.monotonic() > b.deadline:
        raise ChatTemplateError(f"chat template ran for more than {b.limits.max_seconds} s; refusing to render it")


def _too_big(what: str, n: int, cap: int) -> ChatTemplateError:
    return ChatTemplateError(f"chat template would make {what} of {n} items or characters (limit {cap})")


def _made(value: Any) -> Any:
    """Count a value a step made against the per-value caps and the running total."""
    is_str = isinstance(value, str)
    b = _BUDGET.get()
    if is_str or isinstance(value, (list, tuple, dict, set, frozenset)):
        n = len(value)
        if b is not None:
            cap = b.max_chars if is_str else b.max_items
            if n > cap:
                raise _too_big("a string" if is_str else "a container", n, cap)
            b.total += n
    if b is not None and b.total > b.max_total:
        raise ChatTemplateError(f"chat template made more than {b.max_total} characters and items in all; "
                                "refusing to render it")
    return value


def _check_size(what: str, n: int, items: bool = False) -> None:
    cap = _limits()[1 if items else 0]
    if n > cap:
        raise _too_big(what, n, cap)


def _str_size(x: Any, limit: int, escapes: int = 6) -> int:
    """An upper bound on len(str(x)) (also on its JSON and pprint forms with small indents), that
    stops counting past ``limit``: a list may hold one big string a million times over.
    ``escapes=1`` counts the characters of the strings inside instead (the size of an input)."""
    from jinja2.utils import Namespace

    if isinstance(x, str):
        return len(x)
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += escapes * len(v) + 4  # quotes; escapes (\n, \x00, \u0000) are at most 6 chars a char
        elif isinstance(v, Mapping):
            total += 4 * len(v) + 2
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 * len(v) + 2
            stack.extend(v)
        elif isinstance(v, Namespace):
            total += 16
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        else:
            total += 64  # floats, None, Undefined, ranges, macros: short reprs
    return total


def _as_str(x: Any) -> str:
    """str(x), refused first if it would be too long."""
    if not isinstance(x, str):
        cap = _limits()[0]
        n = _str_size(x, cap)
        if n > cap:
            raise _too_big("a string", n, cap)
        x = str(x)
    return x


# --------------------------------------------------------------------------- the guards


class _Counted:
    """A loop's iterable: each item it yields is one step. Keeps len() (``loop.length``)."""
    __slots__ = ("_it",)

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        for x in self._it:
            _step()
            yield x

    def __len__(self):
        return len(self._it)


def _guard_out(x: Any) -> str:
    """Every piece a template prints (to the output or into a ``{% set %}`` block)."""
    return _made(_as_str(x))


def _guard_concat(*parts: Any) -> str:
    """The ``~`` operator."""
    strs = [_as_str(p) for p in parts]
    _check_size("a string", sum(map(len, strs)))
    return _made("".join(strs))


def _safe_range(*args: int) -> range:
    r = range(*args)
    max_range = _limits()[2].max_range
    try:
        n = len(r)
    except OverflowError:  # more than sys.maxsize items
        n = max_range + 1
    if n > max_range:
        raise ChatTemplateError(f"chat template asked for range({', '.join(map(str, args))}): more than "
                                f"{max_range} items")
    return r


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _check_printf(fmt: str, args: Any) -> None:
    """``fmt % args``: no ``*`` widths, widths and precisions within the cap, arguments that
    stringify within it."""
    cap = _limits()[0]
    for m in _PRINTF.finditer(fmt):
        for g in m.group(1, 2):
            if g == "*":
                raise ChatTemplateError("chat template uses a '*' width in %-formatting, which is not allowed")
            if g is not None and int(g) > cap:
                raise _too_big("a %-formatted field", int(g), cap)
    _check_size("a %-formatted string", len(fmt) + _str_size(args, cap))


def _check_spec(spec: str) -> None:
    """A ``str.format`` field spec: its width and precision within the cap."""
    cap = _limits()[0]
    for digits in re.findall(r"\d+", spec):
        if len(digits) > 12 or int(digits) > cap:
            raise _too_big("a formatted field", int(digits[:13]), cap)


def _check_binop(op: str, left: Any, right: Any) -> None:
    limits = _limits()[2]
    seqs = (str, list, tuple)
    if op == "*":
        if isinstance(left, seqs) and isinstance(right, int):
            _check_size("a repeated sequence", len(left) * max(right, 0), not isinstance(left, str))
        elif isinstance(right, seqs) and isinstance(left, int):
            _check_size("a repeated sequence", len(right) * max(left, 0), not isinstance(right, str))
        elif isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > limits.max_int_bits:
                raise _too_big("an int (in bits)", bits, limits.max_int_bits)
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = (abs(left).bit_length() - 1) * right
            if bits > limits.max_int_bits:
                raise _too_big("an int (in bits)", bits, limits.max_int_bits)
    elif op == "+":
        if isinstance(left, seqs) and isinstance(right, seqs):
            _check_size("a concatenation", len(left) + len(right), not isinstance(left, str))
    elif op == "%" and isinstance(left, str):
        _check_printf(left, right)


_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _replace_size(s: Any, old: Any, new: Any, count: Any) -> int:
    n = _str_size(s, 1 << 62)
    if not isinstance(old, str) or not isinstance(new, str):
        return n
    hits = (n + 1) if old == "" else (s.count(old) if isinstance(s, str) else n)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return n + hits * len(new)


def _join_parts(items: Any, getter=None) -> tuple[list, int]:
    """(the items as a list, the length of their join without the separators)."""
    parts = list(items)
    if getter is not None:
        parts = [getter(x) for x in parts]
    cap = _limits()[0]
    n = 0
    for p in parts:
        n += _str_size(p, cap)
        if n > cap:
            raise _too_big("a joined string", n, cap)
    return parts, n


def _check_str_method(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Pre-checks for the str methods that can amplify; returns the (maybe materialized) args."""
    s, name = obj.__self__, obj.__name__
    if name in _WIDTH_METHODS:
        width = _arg(args, kwargs, 0, "width", 0)
        if isinstance(width, int):
            _check_size(f"str.{name}() result", width)
    elif name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(tab, int):
            _check_size("str.expandtabs() result", len(s) + s.count("\t") * max(tab, 0))
    elif name == "replace":
        _check_size("str.replace() result", _replace_size(s, _arg(args, kwargs, 0, "old"),
                                                          _arg(args, kwargs, 1, "new"), _arg(args, kwargs, 2, "count")))
    elif name == "join" and args:
        parts, n = _join_parts(args[0])
        _check_size("str.join() result", n + len(s) * max(len(parts) - 1, 0))
        args = (parts,) + args[1:]
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _check_size("str.translate() result", len(s) * max(longest, 1))
    return args


# filters whose value is turned into a string (str() of a container can be huge)
_STRINGIFYING = {"string", "trim", "upper", "lower", "title", "capitalize", "truncate", "striptags", "wordcount",
                 "safe", "center", "indent", "wordwrap", "format", "replace"}
# ... and how much longer than that string each can make its result
_GROWTH = {"escape": 6, "e": 6, "forceescape": 6, "urlencode": 12, "xmlattr": 6, "pprint": 2}


def _check_filter(name: str, ctx: tuple, value: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """Pre-checks for the filters that can amplify; returns the (maybe materialized) value and args."""
    cap = _limits()[0]
    if name in _STRINGIFYING or name in _GROWTH:
        _check_size(f"|{name} result", _str_size(value, cap) * _GROWTH.get(name, 1))
    if name == "center":
        width = _arg(args, kwargs, 0, "width", 80)
        if isinstance(width, int):
            _check_size("|center result", width)
    elif name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        w = width if isinstance(width, int) else _str_size(width, cap)
        n = _str_size(value, cap)
        lines = value.count("\n") + 1 if isinstance(value, str) else n + 1
        _check_size("|indent result", n + lines * max(w, 0))
    elif name == "wordwrap":
        wrap = _arg(args, kwargs, 2, "wrapstring", None)
        n = _str_size(value, cap)
        _check_size("|wordwrap result", n * (1 + (_str_size(wrap, cap) if wrap is not None else 2)))
    elif name == "replace":
        _check_size("|replace result", _replace_size(value, _arg(args, kwargs, 0, "old"),
                                                     _arg(args, kwargs, 1, "new"), _arg(args, kwargs, 2, "count")))
    elif name == "format":
        if isinstance(value, str):
            _check_printf(value, kwargs or args)
    elif name == "join":
        from jinja2.filters import make_attrgetter

        attribute = _arg(args, kwargs, 1, "attribute", None)
        getter = make_attrgetter(ctx[0].environment, attribute) if attribute is not None else None
        value, n = _join_parts(value, getter)
        sep = _arg(args, kwargs, 0, "d", "")
        _check_size("|join result", n + _str_size(sep, cap) * max(len(value) - 1, 0))
        args, kwargs = (sep,), {}  # the attribute is applied already
    elif name in ("batch", "slice"):
        n = _arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 1)
        if isinstance(n, int):
            _check_size(f"|{name} count", n)
    elif name in _SLOW_TEXT:
        _check_size(f"|{name} input", _str_size(value, cap) * 16)
    return value, args, kwargs


_SLOW_TEXT = {"wordwrap", "urlize"}  # Python loops over every word: inputs capped at 1/16 of a string


def _bounded_sum(ctx: tuple, value: Any, args: tuple, kwargs: dict, f):
    """|sum: of sequences in linear time (builtin sum() of lists is quadratic), the result's
    length checked first; of numbers as jinja sums them."""
    from itertools import chain

    from jinja2.filters import make_attrgetter

    attribute = _arg(args, kwargs, 0, "attribute", None)
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, (list, tuple)):
        return f(*ctx, value, *args, **kwargs)
    items = list(value)
    if attribute is not None:
        getter = make_attrgetter(ctx[0], attribute)
        items = [getter(x) for x in items]
    for x in items:
        if type(x) is not type(start):
            raise TypeError(f'can only concatenate {type(start).__name__} (not "{type(x).__name__}") '
                            f"to {type(start).__name__}")
    _check_size("|sum result", len(start) + sum(map(len, items)), items=True)
    return type(start)(chain(start, *items))


def _guard_filter(name: str, f):
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # context/env first

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        _step()
        if name == "sum" and len(args) > skip:
            return _made(_bounded_sum(args[:skip], args[skip], args[skip + 1:], kwargs, f))
        if len(args) > skip:
            value, rest, kwargs = _check_filter(name, args[:skip], args[skip], args[skip + 1:], kwargs)
            args = args[:skip] + (value,) + tuple(rest)
        return _made(f(*args, **kwargs))

    return guarded


# --------------------------------------------------------------------------- the environment


@functools.lru_cache(maxsize=1)
def _environment_class():
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from jinja2.visitor import NodeTransformer
    from markupsafe import Markup

    class SpecCheck:
        def format_field(self, value, format_spec):
            _check_spec(format_spec)
            _as_str(value)
            return _made(super().format_field(value, format_spec))

    class Formatter(SpecCheck, SandboxedFormatter):
        pass

    class EscapeFormatter(SpecCheck, SandboxedEscapeFormatter):
        pass

    class Guards(NodeTransformer):
        """Rewrites ``for x in it`` to ``for x in __genfuse_iter(it)``, ``{{ e }}`` to
        ``{{ __genfuse_out(e) }}`` and ``a ~ b`` to ``__genfuse_concat(a, b)``."""

        @staticmethod
        def call(name, args, like):
            return nodes.Call(nodes.Name(name, "load"), args, [], None, None).set_lineno(like.lineno, override=False)

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = self.call(_ITER, [node.iter], node)
            return node

        def visit_Output(self, node):
            self.generic_visit(node)
            node.nodes = [self.call(_OUT, [n], n) for n in node.nodes]
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return self.call(_CONCAT, list(node.nodes), node)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.globals["range"] = _safe_range
            self.globals[_ITER] = _Counted
            self.globals[_OUT] = _guard_out
            self.globals[_CONCAT] = _guard_concat
            lipsum = self.globals.get("lipsum")
            if lipsum is not None:
                def bounded_lipsum(n=5, html=True, min=20, max=100):
                    _check_size("lipsum()", n * max * 16)
                    return lipsum(n, html, min, max)
                self.globals["lipsum"] = bounded_lipsum
            self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

        def compile_guarded(self, source: str):
            ast = Guards().visit(self.parse(source))
            ast.set_environment(self)
            return self.from_string(ast)

        def call_binop(self, context, operator, left, right):
            b = _BUDGET.get()
            if b is not None and operator == "+" and type(left) is str and type(right) is str:
                # the common case (templates build each turn with +), checked inline
                n = len(left) + len(right)
                if n > b.max_chars:
                    raise _too_big("a concatenation", n, b.max_chars)
                b.total += n
                if b.total > b.max_total:
                    _made("")  # raises with the message
                _step()
                return left + right
            _step()
            _check_binop(operator, left, right)
            return _made(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: B902 (jinja's own signature)
            _step()
            if isinstance(getattr(__obj, "__self__", None), str):
                args = _check_str_method(__obj, args, kwargs)
            return _made(super().call(__context, __obj, *args, **kwargs))

        def getitem(self, obj, argument):
            value = super().getitem(obj, argument)
            return _made(value) if isinstance(argument, slice) else value

        def wrap_str_format(self, value):
            # jinja's own, with a formatter that checks each field's width first
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            f_self, is_map = value.__self__, value.__name__ == "format_map"
            formatter = (EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup)
                         else Formatter(self))

            def wrapper(*args, **kwargs):
                if is_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one positional argument")
                    kwargs, args = args[0], ()
                return type(f_self)(formatter.vformat(f_self, args, kwargs))

            return functools.update_wrapper(wrapper, value)

    class Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just emits the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return BoundedEnvironment, Generation


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > 64:
        raise ChatTemplateError(f"chat template asked for tojson(indent={width}); at most 64")
    cap = _limits()[0]
    _check_size("a tojson result", _str_size(x, cap) * (1 + width))
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    if isinstance(fmt, str):
        _check_size("a strftime_now() result", 32 * len(fmt))  # %c is 24 characters
    return datetime.now().strftime(fmt)


def compile_template(template: str):
    """The template compiled as Hugging Face compiles it (transformers.utils.chat_template_utils),
    in the bounded sandbox; ValueError if it does not parse or is too big."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    return _compile(template)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2.ext

    limit = DEFAULT_LIMITS.max_template_chars
    if len(template) > limit:
        raise ChatTemplateError(f"chat template is {len(template)} characters long (limit {limit})")
    if _RESERVED in template:
        raise ChatTemplateError(f"chat template uses names starting with {_RESERVED!r}, which genfuse reserves")
    env_class, generation = _environment_class()

    def raise_exception(message):
        raise ChatTemplateError(f"chat template refused the messages: {message}")

    env = env_class(trim_blocks=True, lstrip_blocks=True, extensions=[generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.compile_guarded(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from e
    except RecursionError:
        raise ChatTemplateError("chat template nests too deeply to parse") from None


def render(template: str, limits: TemplateLimits = DEFAULT_LIMITS, **variables: Any) -> str:
    """Render ``template`` with ``variables`` within ``limits``; ChatTemplateError past them."""
    compiled = compile_template(template)
    budget = _Budget(limits, _str_size(variables, 1 << 62, escapes=1))
    token = _BUDGET.set(budget)
    try:
        out = compiled.render(**variables)
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply (macros or recursive loops)") from None
    except MemoryError:
        raise ChatTemplateError("chat template ran out of memory") from None
    except OverflowError as e:  # float ** float past 1e308 and the like
        raise ChatTemplateError(f"chat template arithmetic overflowed ({e})") from None
    except ValueError:
        raise
    except Exception as e:  # SecurityError, UndefinedError, a TypeError in the template's own code
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)
    if len(out) > budget.max_chars:
        raise _too_big("an output", len(out), budget.max_chars)
    return out
