"""The lexical half of the JSON Schema compiler: regexes for JSON strings, numbers in a range, string
formats and a schema's `pattern`, each over the text jaxgen writes (compact JSON, one encoding per
character). jaxgen.schema assembles them into a document's regex; outlines-core compiles that. Also a
user's own regex (`regex=`, `whitespace=`) written out with Python's meaning (`python_regex`, below).

Every regex here is a *subset* of what the schema allows (sound: whatever it matches validates with
jsonschema and the format checkers jsonschema uses), usually all of it in jaxgen's canonical form
(tests/test_schema.py checks both with hypothesis). The dialect is the common ground of Python's `re`
(the tests) and Rust's regex-automata (outlines-core): `[0-9]`, never `\\d` (Unicode digits in Rust),
`\\uXXXX` / `\\UXXXXXXXX` escapes, no lookaround.

Strings. A character is written as itself, or as `\\"` `\\\\` `\\b` `\\f` `\\n` `\\r` `\\t` (the JSON
escapes of those characters); other control characters, `\\/` and `\\uXXXX` are never written, so
each string has exactly one encoding: lengths count characters as jsonschema does (`len`), and a set
of key names can be excluded exactly.
"""
from __future__ import annotations

import functools
import math
import re
import warnings

try:  # Python 3.11+
    from re import _constants as _C, _parser as _P
except ImportError:  # Python 3.10
    import sre_constants as _C
    import sre_parse as _P

CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\bfnrt])'  # one character of a JSON string, as jaxgen writes it
INTEGER = r"(?:0|-?[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
MAX_CODE = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # never in UTF-8 text (and Rust's regex refuses them in a class)
_ESCAPES = {'"': '\\\\"', "\\": "\\\\\\\\", "\b": "\\\\b", "\f": "\\\\f", "\n": "\\\\n", "\r": "\\\\r",
            "\t": "\\\\t"}  # character -> the regex matching its JSON escape


class Refused(ValueError):
    """A keyword jaxgen cannot enforce exactly: the caller names where it is."""


class NoMatch(Refused):
    """No string jaxgen writes satisfies the keyword: the value is impossible (an optional property
    is then left out, as an unsatisfiable minLength / maxLength leaves it)."""


def escape(text: str) -> str:
    """A regex matching `text` literally (Python's re.escape writes `\\ ` for a space: not Rust)."""
    return "".join("\\" + c if c in r".^$*+?()[]{}|\-&~#" else c for c in text)


# ---- character sets -----------------------------------------------------------------------------
def _norm(ranges):
    """Sorted, merged, surrogate-free [(lo, hi)] code point ranges."""
    out = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def _complement(ranges, universe=((0, MAX_CODE),)):
    out, (ulo, uhi) = [], universe[0]
    at = ulo
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, min(lo - 1, uhi)))
        at = max(at, hi + 1)
    if at <= uhi:
        out.append((at, uhi))
    return _norm([(a, b) for a, b in out if a <= b])


def _cp(c: int) -> str:
    if chr(c).isalnum() and c < 128:
        return chr(c)
    return f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"


def encode_set(ranges) -> str | None:
    """The regex of one character from a set of code point ranges, JSON-encoded; None if no such
    character can be written (only control characters without a short escape)."""
    ranges = _norm(ranges)
    if ranges == _norm([(0, MAX_CODE)]):
        return CHAR
    special = {ord(c) for c in _ESCAPES} | set(range(0x20))
    plain = _norm([(a, b) for lo, hi in ranges for a, b in _split_out(lo, hi, special)])
    parts = []
    if len(plain) == 1 and plain[0][0] == plain[0][1]:
        parts.append(escape(chr(plain[0][0])) if 32 < plain[0][0] < 127 else _cp(plain[0][0]))
    elif plain:
        parts.append("[" + "".join(_cp(a) if a == b else f"{_cp(a)}-{_cp(b)}" for a, b in plain) + "]")
    parts += [_ESCAPES[c] for c in sorted(_ESCAPES) if any(lo <= ord(c) <= hi for lo, hi in ranges)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _split_out(lo, hi, points):
    """[lo, hi] less the code points in `points`."""
    at = lo
    for p in sorted(x for x in points if lo <= x <= hi):
        if p > at:
            yield at, p - 1
        at = p + 1
    if at <= hi:
        yield at, hi


def string_regex(content: str) -> str:
    return '"' + content + '"'


def repeat(unit: str, lo: int, hi: int | None) -> str:
    if hi is not None and hi == lo:
        return "" if lo == 0 else unit if lo == 1 else f"{unit}{{{lo}}}"
    if hi is None:
        return f"{unit}*" if lo == 0 else f"{unit}+" if lo == 1 else f"{unit}{{{lo},}}"
    return f"{unit}?" if (lo, hi) == (0, 1) else f"{unit}{{{lo},{hi}}}"


# A part of a regex tree that matches nothing (an empty character set, or a set of characters jaxgen
# never writes) is None, and the writers below drop what it makes empty: a sequence holding it, an
# alternative, a repeat of at least one. Why: outlines-core refuses a regex with a dead end after a
# prefix (for `a[^\s\S]|b`: "no token sequence satisfies it", though "b" does).
def _seq(parts: list) -> str | None:
    return None if None in parts else "".join(parts)


def _alt(parts: list) -> str | None:
    live = [p for p in parts if p is not None]
    return "(?:" + "|".join(live) + ")" if live else None


def _repeat_of(sub: str | None, lo: int, hi: int | None) -> str | None:
    if sub is None:
        return "" if lo == 0 else None
    return repeat("(?:" + sub + ")", lo, hi)


# ---- integers and numbers in a range ------------------------------------------------------------
def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching the digit strings of one length from lo to hi (lo <= hi)."""
    n = len(lo)
    if lo == hi:
        return [lo]
    if lo == "0" * n and hi == "9" * n:
        return [repeat("[0-9]", n, n)]
    if lo[0] == hi[0]:
        rest = _same_length(lo[1:], hi[1:])
        return [lo[0] + (rest[0] if len(rest) == 1 else "(?:" + "|".join(rest) + ")")]
    out = []
    a, b = int(lo[0]), int(hi[0])
    if lo[1:] == "0" * (n - 1):
        a -= 1  # lo's first digit joins the full middle run
    else:
        out += [lo[0] + x for x in _same_length(lo[1:], "9" * (n - 1))]
    top = hi[1:] == "9" * (n - 1)
    if b - (0 if top else 1) >= a + 1:
        first, last = a + 1, b - (0 if top else 1)
        digit = str(first) if first == last else f"[{first}-{last}]"
        out.append(digit + repeat("[0-9]", n - 1, n - 1))
    if not top:
        out += [hi[0] + x for x in _same_length("0" * (n - 1), hi[1:])]
    return out


def natural_range(lo: int, hi: int | None) -> str | None:
    """Regex of the decimal naturals (no leading zeros) from lo to hi (None: unbounded); None if empty."""
    lo = max(lo, 0)
    if hi is not None and hi < lo:
        return None
    alts = []
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    for length in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (length - 1) if length > 1 else 0)
        b = min(top, 10 ** length - 1)
        if a <= b:
            alts += _same_length(str(a), str(b))
    if hi is None:
        alts.append("[1-9]" + repeat("[0-9]", len(str(lo)), None))
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def integer_range(lo: int | None, hi: int | None) -> str | None:
    """Regex of the JSON integers in [lo, hi] (None: unbounded), canonical (no "-0", no leading zeros)."""
    alts = []
    if hi is None or hi >= 0:
        alts.append(natural_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        neg = natural_range(max(1, -hi) if hi is not None else 1, -lo if lo is not None else None)
        if neg is not None:
            alts.append("-" + neg)
    alts = [a for a in alts if a is not None]
    if not alts:
        return None
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


_ANY_FRAC, _ZERO_FRAC = r"(?:\.[0-9]+)?", r"(?:\.0+)?"
# A decimal of at most 15 significant digits is the only one of them its float64 stands for (DBL_DIG),
# so it keeps its strict order with every other such decimal: jsonschema parses a number to a float
# before comparing it with a bound or asking whether it is an integer, and 2.9999999999999999 parses to
# 3.0 (not < 3) and 1.0000000000000001 to 1.0 (an integer). Where that can matter, the fraction is cut so
# that the number has at most 15 significant digits (a narrowing: longer decimals there are not written).
_DIGITS = 15


def _frac(n: int, zero: bool) -> str | None:
    """Regex of the fractions of a decimal whose integer part is n, at most _DIGITS significant digits
    in all (the integer part's, or 15 after the point for n = 0); zero: the fraction may be absent or
    all zeros (else it has a non-zero digit). None: no such fraction (zero=False, n of 15 digits)."""
    room = _DIGITS - (len(str(n)) if n else 0)
    if room <= 0:
        return "" if zero else None
    return f"(?:\\.[0-9]{{1,{room}}})?" if zero else f"\\.[0-9]{{0,{room - 1}}}[1-9]"


def _magnitude(a: int, a_excl: bool, b: int | None, b_excl: bool, fraction: bool = False) -> str | None:
    """Regex of the decimals m (no exponent) with a <(=) m <(=) b, a and b naturals (b None: no bound);
    fraction: only the m that are not whole numbers. Inclusive bounds hold whatever the digits (a float
    rounds monotonically: a <= m <= b gives a <= float(m) <= b); a fraction next to an exclusive bound,
    and every fraction where only non-integers are wanted, has at most 15 significant digits (_frac)."""
    if b is not None and b < a:
        return None
    if b is not None and b == a:
        return None if a_excl or b_excl or fraction else f"{a}{_ZERO_FRAC}"
    alts = []
    near_b = b_excl and b == a + 1  # a's own fractions could round up to b
    if a_excl or fraction or near_b:
        alts.append(None if (f := _frac(a, zero=not (a_excl or fraction))) is None else f"{a}{f}")
    else:
        alts.append(f"{a}{_ANY_FRAC}")
    top = None if b is None else b - 1  # the middle: integer parts a + 1 .. top
    if fraction:  # by length, each with its cut: no non-integer has an integer part of 15 digits
        for length in range(len(str(a + 1)), _DIGITS):
            lo, hi = max(a + 1, 10 ** (length - 1)), 10 ** length - 1 if top is None else min(top, 10 ** length - 1)
            if lo <= hi:
                alts.append(f"{natural_range(lo, hi)}{_frac(lo, zero=False)}")
    else:
        if b_excl and top is not None and top >= a + 1:  # top's fractions could round up to b: cut them
            alts.append(f"{top}{_frac(top, zero=True)}")
            top -= 1
        middle = natural_range(a + 1, top)
        if middle is not None:
            alts.append(f"{middle}{_ANY_FRAC}")
    if b is not None and not b_excl and not fraction:
        alts.append(f"{b}{_ZERO_FRAC}")
    alts = [x for x in alts if x is not None]
    return None if not alts else "(?:" + "|".join(alts) + ")"


def number_range(lo, lo_excl: bool, hi, hi_excl: bool, integer: bool, fraction: bool = False) -> str | None:
    """Regex of the JSON numbers (integers if `integer`; if `fraction`, the numbers that are not
    integers, as {"not": {"type": "integer"}} leaves them: 1.0 and 1e2 are integers to JSON Schema, so
    these are written with a non-zero fractional digit and no exponent) between the bounds (None:
    unbounded); None if there are none. A number's bounds must be whole numbers (else Refused): the
    decimal expansion of an arbitrary bound is not worth its states."""
    if integer:
        ilo = None if lo is None else (math.floor(lo) + 1 if lo_excl and float(lo).is_integer() else math.ceil(lo))
        ihi = None if hi is None else (math.ceil(hi) - 1 if hi_excl and float(hi).is_integer() else math.floor(hi))
        if lo is None and hi is None:
            return INTEGER
        return integer_range(ilo, ihi)
    if lo is None and hi is None and not fraction:
        return NUMBER
    for bound in (lo, hi):
        if bound is not None and not float(bound).is_integer():
            raise Refused(f"a number bound of {bound} (jaxgen writes exact ranges for whole-number bounds "
                          "of numbers, any bounds of integers)")
    lo = None if lo is None else int(lo)
    hi = None if hi is None else int(hi)
    alts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_excl):  # x >= 0
        a, ax = (0, False) if lo is None or lo < 0 else (lo, lo_excl)
        alts.append(_magnitude(a, ax, hi, hi_excl, fraction))
    if lo is None or lo < 0:  # x < 0: its magnitude
        a, ax = (0, True) if hi is None or hi >= 0 else (-hi, hi_excl)
        m = _magnitude(a, ax, None if lo is None else -lo, lo_excl, fraction)
        alts.append(None if m is None else "-" + m)
    alts = [a for a in alts if a is not None]
    if not alts:
        return None
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


# ---- formats ------------------------------------------------------------------------------------
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_DPART = r"(?:[0-9]+Y(?:[0-9]+M)?(?:[0-9]+D)?|[0-9]+M(?:[0-9]+D)?|[0-9]+D)"
_TPART = r"(?:[0-9]+H(?:[0-9]+M)?(?:[0-9]+S)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_H = r"[0-9a-fA-F]{1,4}"
_PCT = r"%[0-9A-Fa-f]{2}"
_PCHAR = rf"(?:[A-Za-z0-9._~!$&'()*+,;=:@\-]|{_PCT})"
_TAIL = rf"(?:/{_PCHAR}*)*(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?"
_URI = rf"[A-Za-z][A-Za-z0-9+.\-]*://(?:[A-Za-z0-9._~\-]|{_PCT})+(?::[0-9]+)?{_TAIL}"
# A relative reference's path (RFC 3986 4.2): absolute ("/", then a non-empty first segment if any more
# follow: "//x" would be read as an authority, so jsonschema refuses "//::"), or a first segment without ":"
# (else it reads as a scheme).
_RELATIVE = (rf"(?:/(?:{_PCHAR}+(?:/{_PCHAR}*)*)?|(?:[A-Za-z0-9._~!$&'()*+,;=@\-]|{_PCT})+(?:/{_PCHAR}*)*)"
             rf"(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?")
# Each: a regex of the format's strings (ASCII: no JSON escapes needed), a subset of what jsonschema's
# format checker accepts (rfc3339-validator, isoduration, fqdn, ipaddress, rfc3986-validator), and
# what it leaves out, for the README.
FORMATS = {
    "date-time": (f"{_DATE}T{_TIME}", "upper-case T and Z; no leap second"),
    "date": (_DATE, ""),
    "time": (_TIME, "with its offset, as RFC 3339 requires"),
    "duration": (rf"P(?:{_DPART}(?:T{_TPART})?|T{_TPART}|[0-9]+W)", "whole numbers of each unit"),
    "email": (r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+", "no quoted local parts"),
    "hostname": (rf"{_LABEL}(?:\.{_LABEL}){{0,2}}", "at most three labels"),
    "ipv4": (rf"{_OCTET}(?:\.{_OCTET}){{3}}", ""),
    "ipv6": (rf"(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|(?:{_H}:){{1,6}}:{_H}|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
             rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
             rf"|{_H}:(?::{_H}){{1,6}}|:(?::{_H}){{1,7}}|::)", "no embedded IPv4, no zone"),
    "uri": (_URI, "scheme://host[:port] then path, query, fragment; no user info or IP literal"),
    "uri-reference": (f"(?:{_URI}|{_RELATIVE})",
                      "a URI as above, or a non-empty relative reference not starting \"//\" (no host)"),
    "iri": (_URI, "ASCII, as uri"),
    "iri-reference": (f"(?:{_URI}|{_RELATIVE})", "ASCII, as uri-reference"),
    "uuid": (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", ""),
    "json-pointer": (r"(?:/(?:[A-Za-z0-9 !#-.:-}]|~[01])*)*", "printable ASCII, no escapes"),
}
# formats JSON Schema defines (and jsonschema checks) that jaxgen does not write: refused. A format
# outside both lists (int32, byte, a vendor's own) is an annotation: nothing checks it.
UNSUPPORTED_FORMATS = {"idn-email", "idn-hostname", "uri-template", "regex", "relative-json-pointer",
                       "host-name", "ip-address", "color", "utc-millisec"}


def width(regex: str) -> tuple[int, float]:
    """(min, max) characters a regex over ASCII text matches (max inf: unbounded)."""
    lo, hi = _P.parse(regex).getwidth()
    return lo, (math.inf if hi >= _C.MAXREPEAT else hi)


# ---- pattern ------------------------------------------------------------------------------------
_DIGIT, _WORD = [(48, 57)], [(48, 57), (65, 90), (95, 95), (97, 122)]
_SPACE_ASCII = [(9, 13), (28, 32)]  # what Python's \s matches below 128 (str patterns)
_CATEGORY = {  # (a subset of the category, its exact extent within ASCII)
    _C.CATEGORY_DIGIT: (_DIGIT, _DIGIT), _C.CATEGORY_WORD: (_WORD, _WORD),
    _C.CATEGORY_SPACE: (_SPACE_ASCII, _SPACE_ASCII)}
_NOT = {_C.CATEGORY_NOT_DIGIT: _C.CATEGORY_DIGIT, _C.CATEGORY_NOT_WORD: _C.CATEGORY_WORD,
        _C.CATEGORY_NOT_SPACE: _C.CATEGORY_SPACE}
_ASCII = [(0, 127)]


def _charset(items) -> list:
    """Code point ranges of a `[...]` item list: exact, or (with a negated category such as \\D, whose
    extent beyond ASCII jaxgen does not list) the ASCII part of it, a subset."""
    negate = any(op is _C.NEGATE for op, _ in items)
    ranges, ascii_only = [], False
    for op, av in items:
        if op is _C.LITERAL:
            ranges.append((av, av))
        elif op is _C.RANGE:
            ranges.append(av)
        elif op is _C.CATEGORY:
            if av in _NOT:
                ascii_only = True
                ranges += _complement(_CATEGORY[_NOT[av]][1], _ASCII)
            elif av in _CATEGORY:
                sub, exact = _CATEGORY[av]
                ranges += exact if negate else sub
                ascii_only |= negate
            else:
                raise Refused(f"the class {av} in 'pattern'")
        elif op is not _C.NEGATE:
            raise Refused(f"{op} in a character class of 'pattern'")
    if negate:
        ranges = _complement(ranges)
    return _norm([(a, min(b, 127)) for a, b in ranges if a <= 127]) if ascii_only else _norm(ranges)


def _translate(items) -> str | None:
    """The content regex of a parsed pattern's item list; None if no string jaxgen writes matches it."""
    out = []
    for op, av in items:
        if op is _C.LITERAL:
            sets = [(av, av)]
        elif op is _C.NOT_LITERAL:
            sets = _complement([(av, av)])
        elif op is _C.ANY:
            sets = _complement([(10, 10)])
        elif op is _C.IN:
            sets = _charset(av)
        elif op is _C.CATEGORY:
            sets = _charset([(op, av)])
        else:
            sets = None
        if sets is not None:
            out.append(encode_set(sets))  # None: only characters jaxgen does not write (or none at all)
        elif op is _C.BRANCH:
            out.append(_alt([_translate(b) for b in av[1]]))
        elif op is _C.SUBPATTERN:
            group, add, _, sub = av
            if add & (_C.SRE_FLAG_IGNORECASE | _C.SRE_FLAG_MULTILINE | _C.SRE_FLAG_DOTALL | _C.SRE_FLAG_VERBOSE):
                raise Refused("an inline flag ((?i), (?m), (?s), (?x)) in 'pattern'")
            out.append(_alt([_translate(sub)]))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT):  # greedy or lazy: the same set of matches
            lo, hi, sub = av
            out.append(_repeat_of(_translate(sub), lo, None if hi >= _C.MAXREPEAT else hi))
        else:
            raise Refused(f"{str(op).lower()} in 'pattern' (lookaround, back-references, anchors inside, "
                          "possessive or atomic groups are not regular here)")
    return _seq(out)


def _branches(tree) -> list:
    """The item lists of a parsed regex's top-level alternatives (one: the regex itself)."""
    alts = list(tree)
    return alts[0][1][1] if len(alts) == 1 and alts[0][0] is _C.BRANCH else [alts]


def _strip_anchors(items):
    """(anchored at start, items, anchored at end) of one alternative. An anchor may also open (close)
    every branch of a leading (trailing) alternation: Python factors `^a$|^b$` into `^(?:a$|b$)`."""
    items = list(items)

    def at(item, kinds):
        return item[0] is _C.AT and item[1] in kinds

    starts, ends = _STARTS, _ENDS
    start = bool(items) and at(items[0], starts)
    if start:
        items = items[1:]
    end = bool(items) and at(items[-1], ends)
    if end:
        items = items[:-1]
    elif items and items[-1][0] is _C.BRANCH and all(b and at(b[-1], ends) for b in items[-1][1][1]):
        branches = [_P.SubPattern(b.state, list(b)[:-1]) for b in items[-1][1][1]]
        items, end = items[:-1] + [(_C.BRANCH, (None, branches))], True
    return start, items, end


def pattern(p: str, lengths: tuple[int, int | None] = (0, None)) -> str:
    """The content regex (between the quotes) of the strings `p` matches somewhere (re.search, as
    jsonschema tests `pattern`) whose length is within `lengths`. Refused where the length cannot be
    folded into the pattern exactly."""
    try:
        tree = _P.parse(p)
    except (re.error, OverflowError) as e:  # (OverflowError: a count past 2**32 - 1)
        raise Refused(f"'pattern' {p!r} is not a valid regex ({e})") from None
    if tree.state.flags & (_C.SRE_FLAG_IGNORECASE | _C.SRE_FLAG_MULTILINE):
        raise Refused(f"an inline flag ((?i), (?m)) in 'pattern' {p!r}")
    out = []
    for branch in _branches(tree):
        start, items, end = _strip_anchors(branch)
        any_char = _P.SubPattern(tree.state, [(_C.IN, [(_C.RANGE, (0, MAX_CODE))])])  # newlines too
        anything = (_C.MAX_REPEAT, (0, _C.MAXREPEAT, any_char))
        if lengths != (0, None) and not start and not end:
            out.append(_contains(items, lengths, p, tree.state, any_char))
            continue
        items = ([] if start else [anything]) + items + ([] if end else [anything])
        out.append(_with_length(items, lengths, p, tree.state))
    live = [x for x in out if x is not None]
    if not live:
        raise NoMatch(f"no string jaxgen writes matches 'pattern' {p!r} (it writes no control character "
                      "other than \\b \\f \\n \\r \\t)")
    return live[0] if len(live) == 1 else "(?:" + "|".join(live) + ")"


def _contains(items, lengths, p, state, any_char) -> str:
    """Strings with lengths in `lengths` containing a match of `items` somewhere (re.search). The
    match's edges reduce (X{m,n} at an edge -> X{m}: a string contains one iff it contains the other);
    what is left must be one character class X. Written deterministically by the first X: not-X{i}
    X any{lo-i-1, hi-i-1} (ambiguous forms make outlines-core's unminimized DFA explode)."""
    items = list(items)
    while items and items[0][0] in (_C.MAX_REPEAT, _C.MIN_REPEAT) and items[0][1][0] == 0:
        items = items[1:]  # X{0,n} at an open edge matches the empty string
    while items and items[-1][0] in (_C.MAX_REPEAT, _C.MIN_REPEAT) and items[-1][1][0] == 0:
        items = items[:-1]
    if len(items) == 1 and items[0][0] in (_C.MAX_REPEAT, _C.MIN_REPEAT) and items[0][1][0] == 1:
        items = list(items[0][1][2])  # X{1,n} alone: a string contains it iff it contains X
        if _P.SubPattern(state, items).getwidth() != (1, 1):
            items = []
    ranges = _single_class(items)
    lo, hi = lengths
    if ranges is None:
        raise Refused(f"'pattern' {p!r} beside minLength / maxLength (jaxgen intersects lengths with a pattern "
                      "that has one repeated character class, or an unanchored one that looks for one "
                      "character class; write the lengths into the pattern)")
    x, other, anyc = encode_set(ranges), encode_set(_complement(ranges)), encode_set([(0, MAX_CODE)])
    if other in _ESCAPES.values():  # one JSON escape (\\"), repeated below: two atoms of regex
        other = f"(?:{other})"
    if x is None or (hi is not None and hi < max(lo, 1)):
        raise NoMatch(f"no string matches 'pattern' {p!r} within minLength / maxLength")
    top = hi if hi is not None else max(lo, 1)
    alts = []
    for i in range(top):  # the first X at position i
        rest = repeat(anyc, max(lo - i - 1, 0), None if hi is None else hi - i - 1)
        alts.append((repeat(other, i, i) if other else "") + x + rest)
        if other is None:
            break
    if hi is None and other is not None:  # the first X after position lo - 1
        alts.append(repeat(other, top, None) + x + repeat(anyc, 0, None))
    return "(?:" + "|".join(alts) + ")"


def _single_class(items):
    """Code point ranges of a pattern that is exactly one character (a literal, class, `.`), or None."""
    if len(items) != 1:
        return None
    op, av = items[0]
    if op is _C.LITERAL:
        return [(av, av)]
    if op is _C.NOT_LITERAL:
        return _complement([(av, av)])
    if op is _C.ANY:
        return _complement([(10, 10)])
    if op is _C.IN:
        return _charset(av)
    if op is _C.SUBPATTERN and not av[1]:
        return _single_class(list(av[3]))
    return None


def _with_length(items, lengths, p, state) -> str:
    lo, hi = lengths
    sub = _P.SubPattern(state, list(items))
    wmin, wmax = sub.getwidth()
    wmax = math.inf if wmax >= _C.MAXREPEAT else wmax
    if lo <= wmin and (hi is None or wmax <= hi):
        return _translate(items)  # the lengths hold for every match already
    # one variable item (a single character repeated), the rest fixed: fold the lengths into it
    var = [i for i, (op, av) in enumerate(items)
           if op in (_C.MAX_REPEAT, _C.MIN_REPEAT) and av[0] != av[1]]
    if len(var) == 1:
        i = var[0]
        rlo, rhi, body = items[i][1]
        bmin, bmax = _P.SubPattern(state, list(body)).getwidth()
        fixed, fixed_max = _P.SubPattern(state, items[:i] + items[i + 1:]).getwidth()
        if bmin == bmax == 1 and fixed == fixed_max:  # (an alternation of two widths is not fixed)
            nlo = max(rlo, lo - fixed)
            nhi = (None if rhi >= _C.MAXREPEAT else rhi) if hi is None else min(
                hi - fixed, rhi if rhi < _C.MAXREPEAT else hi - fixed)
            if nhi is not None and nhi < nlo:
                raise NoMatch(f"no string matches 'pattern' {p!r} within minLength / maxLength")
            new = list(items)
            new[i] = (items[i][0], (nlo, _C.MAXREPEAT if nhi is None else nhi, body))
            return _translate(new)
    raise Refused(f"'pattern' {p!r} beside minLength / maxLength (jaxgen folds lengths into a pattern with "
                  "one repeated character class, the rest of one width; write the lengths into the pattern)")


# ---- a user's regex (`regex=`), as Python reads it ---------------------------------------------------
# outlines-core reads Rust's regex syntax, which agrees with Python's on most text and not on some that
# both accept: \w \s \d (Python: str.isalnum() + "_", str.isspace(), str.isdecimal(); Rust's Unicode
# properties add marks and joiners to \w and leave \x1c-\x1f out of \s), "[" "&&" "--" "~~" inside a
# class (characters in Python, a nested class or set operation in Rust), "{" that starts no repeat
# (a character in Python, an error in Rust), (?x) whitespace inside a class, (?i) on a few characters.
# So a regex is parsed by Python and written again from its tree: every character set spelled out as
# the code points Python's own engine matches, with the flags in force, so that the automaton is the
# language re.fullmatch accepts. Only the anchors that open or close it are dropped (no-ops for a
# whole-text match); constructs that are not regular are refused.
_FLAGS = _C.SRE_FLAG_IGNORECASE | _C.SRE_FLAG_DOTALL | _C.SRE_FLAG_ASCII  # those a character's set depends on
_ESCAPE_OF = {_C.CATEGORY_DIGIT: r"\d", _C.CATEGORY_NOT_DIGIT: r"\D", _C.CATEGORY_WORD: r"\w",
              _C.CATEGORY_NOT_WORD: r"\W", _C.CATEGORY_SPACE: r"\s", _C.CATEGORY_NOT_SPACE: r"\S"}
_NOT_REGULAR = {_C.GROUPREF: "a back-reference", _C.GROUPREF_EXISTS: "a conditional group",
                _C.ASSERT: "a lookahead / lookbehind", _C.ASSERT_NOT: "a lookahead / lookbehind",
                _C.AT: "an anchor or word boundary inside the regex (only ^ / \\A where no character can come "
                       "before it and $ / \\Z where none can come after it are taken)",
                **{getattr(_C, name): what for name, what in (("ATOMIC_GROUP", "an atomic group"),
                                                              ("POSSESSIVE_REPEAT", "a possessive repeat"))
                   if hasattr(_C, name)}}  # (Python 3.11+)


def python_regex(p: str) -> str:
    """The regex outlines-core should build for `p` (Python syntax), matching what re.fullmatch(p, text)
    matches: the same language, in the dialect both engines read alike (explicit code point sets,
    non-capturing groups, counted repeats). ValueError for what is not a regular language."""
    return _python_regex(p, "regex")[0]


def json_whitespace(p: str, label: str = "whitespace") -> str:
    """`python_regex` of a schema's whitespace regex (`whitespace=`), which may write JSON's whitespace
    characters only (space, tab, newline, carriage return: anything else would not parse as JSON).
    Errors name it `label` (the front end's name for the knob)."""
    regex, used = _python_regex(p, label)
    extra = _norm([(a, b) for lo, hi in used for a, b in _split_out(lo, hi, (9, 10, 13, 32))])
    if extra:
        raise ValueError(f"{label} {p!r:.80} also writes U+{extra[0][0]:04X}: JSON's whitespace is space, "
                         "\\t, \\n and \\r only")
    return regex


def _python_regex(p: str, label: str) -> tuple[str, list]:
    """(python_regex(p), the code point ranges it writes)."""
    with warnings.catch_warnings():
        # Python reads "[" "&&" "--" "~~" "||" inside a class as characters and warns that their meaning
        # will change (POSIX classes and set operations, as Rust reads them): refused, not guessed
        warnings.simplefilter("error", FutureWarning)
        try:
            tree = _P.parse(p)
        except (re.error, OverflowError) as e:  # (OverflowError: a count past 2**32 - 1)
            raise ValueError(("" if label == "regex" else f"{label}: ") + f"invalid regex {p!r:.80}: {e}") from None
        except FutureWarning as e:
            raise ValueError(f"{label} {p!r:.80}: {e} (Python reads '[', '&&', '--', '~~' or '||' inside a class "
                             "as characters, other engines as a nested class or set operation: escape it)") from None
    used: list = []
    try:
        regex = _write(list(tree), tree.state.flags, used, tree.state, head=True, tail=True)
    except Refused as e:
        raise ValueError(f"{label} {p!r:.80}: {e} cannot be enforced as a constraint") from None
    if regex is None:
        raise ValueError(f"{label} {p!r:.80} matches no text (a character set in it is empty)")
    return regex, _norm(used)


_STARTS, _ENDS = (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING), (_C.AT_END, _C.AT_END_STRING)


def _write(items, flags: int, used: list, state, head: bool = False, tail: bool = False) -> str | None:
    """The regex of a parsed item list under `flags` (None: it matches nothing); `used` collects the
    character sets written. head / tail: no character can come before / after the items in a match,
    where ^ \\A / $ \\Z always hold under re.fullmatch and are dropped. (Python factors common prefixes
    out of an alternation, so `ab|ac$` arrives as `a(?:b|c$)`: an end anchor inside a group.)"""
    empty = [_P.SubPattern(state, [item]).getwidth()[1] == 0 for item in items]
    out = []
    for k, (op, av) in enumerate(items):
        at_head, at_tail = head and all(empty[:k]), tail and all(empty[k + 1:])
        if op in (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN):
            chars = _chars(op, av, flags)
            used += chars
            out.append(_set_regex(chars) if chars else None)
        elif op is _C.BRANCH:
            out.append(_alt([_write(b, flags, used, state, at_head, at_tail) for b in av[1]]))
        elif op is _C.SUBPATTERN:  # (group, flags added, flags removed, items)
            out.append(_alt([_write(av[3], (flags | av[1]) & ~av[2], used, state, at_head, at_tail)]))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT):  # greedy or lazy: the same language
            lo, hi, sub = av
            once = hi <= 1  # (an anchor inside a repeat of more: refused)
            out.append(_repeat_of(_write(sub, flags, used, state, at_head and once, at_tail and once), lo,
                                  None if hi >= _C.MAXREPEAT else hi))
        elif op is _C.AT and (av in _STARTS and at_head or av in _ENDS and at_tail):
            out.append("")
        else:
            raise Refused(_NOT_REGULAR.get(op, str(op).lower()))
    return _seq(out)


def _chars(op, av, flags: int) -> tuple:
    """The code point ranges one character item matches under `flags`: written out directly for
    literals and plain sets, else found by Python's engine over every code point (cached)."""
    flags &= _FLAGS
    if op is _C.LITERAL and not flags & _C.SRE_FLAG_IGNORECASE:
        return ((av, av),)
    if op is _C.NOT_LITERAL and not flags & _C.SRE_FLAG_IGNORECASE:
        return tuple(_complement([(av, av)]))
    if op is _C.ANY:
        return tuple(_norm([(0, MAX_CODE)]) if flags & _C.SRE_FLAG_DOTALL else _complement([(10, 10)]))
    cp = lambda c: f"\\U{c:08x}"
    if op in (_C.LITERAL, _C.NOT_LITERAL):
        text = ("[^" if op is _C.NOT_LITERAL else "[") + cp(av) + "]"
    else:
        parts = []
        for iop, iav in av:
            if iop is _C.NEGATE:
                parts.insert(0, "^")
            elif iop is _C.LITERAL:
                parts.append(cp(iav))
            elif iop is _C.RANGE:
                parts.append(f"{cp(iav[0])}-{cp(iav[1])}")
            elif iop is _C.CATEGORY and iav in _ESCAPE_OF:
                parts.append(_ESCAPE_OF[iav])
            else:
                raise Refused(f"{str(iop).lower()} in a character class")
        if not flags & _C.SRE_FLAG_IGNORECASE and not any(iop is _C.CATEGORY for iop, _ in av):
            ranges = [(v, v) if iop is _C.LITERAL else v for iop, v in av if iop in (_C.LITERAL, _C.RANGE)]
            return tuple(_complement(ranges) if parts[:1] == ["^"] else _norm(ranges))
        text = "[" + "".join(parts) + "]"
    return _engine_chars(text, flags)


@functools.lru_cache(maxsize=1)
def _code_points() -> tuple:
    """Every code point as text, in the two runs around the surrogates: ((first, text), (first, text))
    (4 MB, made when a regex first needs Python's engine for a set)."""
    return ((0, "".join(map(chr, range(_SURROGATES[0])))),
            (_SURROGATES[1] + 1, "".join(map(chr, range(_SURROGATES[1] + 1, MAX_CODE + 1)))))


@functools.lru_cache(maxsize=256)
def _engine_chars(text: str, flags: int) -> tuple:
    """Code point ranges of the one-character regex `text` under `flags`, as Python's re matches them."""
    rx = re.compile(f"(?:{text})+", flags)
    return tuple(_norm([(m.start() + base, m.end() - 1 + base) for base, s in _code_points() for m in rx.finditer(s)]))


def _set_regex(ranges) -> str:
    """One character of these code point ranges, in the common dialect (escapes for all but ASCII
    letters and digits)."""
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _cp(ranges[0][0])
    return "[" + "".join(_cp(a) if a == b else f"{_cp(a)}-{_cp(b)}" for a, b in ranges) + "]"
