"""JSON Schema -> the regex of the documents jaxgen writes for it (outlines-core then builds the
token automaton). Either a keyword is enforced exactly or the schema is refused with one line naming
where: a constraint never lets an invalid row through.

What is written (the canonical form): compact JSON (or `whitespace` between tokens), object
properties in the schema's order (optional ones may be left out), strings with one encoding per
character (jaxgen.json_regex), integers without leading zeros. Every such document that validates is
matched, but for these documented narrowings, each sound (the language only shrinks):
- an object with `properties` gets no other keys unless `additionalProperties` is a schema or
  `patternProperties` names them (JSON Schema's default `true` would let the model invent keys);
- a value the schema leaves open (`{}`, `true`, an object without properties) nests ANY_DEPTH deep;
- a recursive `$ref` is unrolled ref_depth times (REF_DEPTH by default), then that branch is empty;
- formats are the shapes of json_regex.FORMATS; a number's bounds must be whole numbers;
- with min/maxProperties and no required key, an object starts within its first START_WINDOW keys;
- where the automaton would exceed SIZE_BUDGET: the first setting of SHRINK that fits (long strings
  written shorter, recursion and open values shallower); past that, refused naming the largest part.

How: `$ref` and `allOf` are inlined and merged into one "flat" node (underscored keys); `anyOf` /
`oneOf` / `if` distribute over the rest of their node (`oneOf` only where no document written for one
branch satisfies another's schema: other types, other `enum` / `const` values, a key one requires and
the other never writes, a required key with such values); `enum` / `const` values are kept when
jsonschema validates them against the whole node; the rest is built per type. outlines-core does not
minimize its DFA, so the regexes avoid copies (linear forms for optional properties) and ambiguity.
Keywords JSON Schema does not define are annotations and ignored.
"""
from __future__ import annotations

import json
import re

from jaxgen import json_regex as J
from jaxgen.errors import first_line
from jaxgen.json_regex import Refused

REF_DEPTH = 3  # a recursive $ref is expanded this many times on one path, then that branch is empty
ANY_DEPTH = 2  # how deep a value the schema leaves open may nest
SIZE_BUDGET = 12_000  # estimated automaton states per schema (see _size), before outlines-core builds it
# Where the automaton would exceed SIZE_BUDGET, the first of these (longest string written, recursion
# depth, open-value depth) that fits: sound narrowings (a shorter string satisfies maxLength too; a
# shallower document is one of the schema's). None: maxLength as the schema says.
SHRINK = ((None, 3, 2), (256, 3, 2), (128, 3, 2), (64, 2, 1), (32, 2, 1), (32, 1, 1), (32, 1, 0))
START_WINDOW = 4  # with min/maxProperties and no required property, an object starts within its first 4
_MAX_ALTERNATIVES = 64  # anyOf / oneOf branches after distributing, per node
_MAX_UNIQUE_VALUES = 8  # uniqueItems over a finite item set: values written in set order

# JSON Schema assertion keywords jaxgen does not enforce: refused wherever they occur
_REFUSED = {
    "contains": "not enforced", "minContains": "not enforced",
    "maxContains": "not enforced", "dependentSchemas": "not enforced", "dependentRequired": "not enforced",
    "unevaluatedItems": "not enforced", "unevaluatedProperties": "not enforced",
    "$dynamicRef": "dynamic references are not resolved", "$recursiveRef": "dynamic references are not resolved",
}
_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "$schema", "$id", "id", "readOnly",
                "writeOnly", "deprecated"}
_ATOMS = frozenset({"null", "boolean", "string", "array", "object", "integer", "fraction"})
_TYPE_ATOMS = {"number": {"integer", "fraction"}, "integer": {"integer"}}
_FAMILY_KEYS = {
    "object": {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties"},
    "array": {"_prefix", "_rest", "minItems", "maxItems", "uniqueItems"},
    "string": {"minLength", "maxLength", "_patterns", "_format", "_not_strings"},
    "number": {"_lo", "_hi"}}


class _Ctx:
    def __init__(self, root, ws: str, ref_depth: int, long_string: int | None = None, any_depth: int = 2):
        self.root, self.ws, self.ref_depth, self.long_string = root, ws, ref_depth, long_string
        self.any_depth, self.opened = any_depth, False  # opened: an open value was written
        self.capped = False  # a maxLength was above 32 (a smaller cap would shrink the automaton)
        self.recursed = False  # a $ref was unrolled twice on one path (a smaller depth would)
        self.blame: list = []  # (estimated size, where, keyword) of bounded repetitions
        self.empty: list = []  # "where: why" of the values no string satisfies (a pattern's)
        self._validator = None

    def valid(self, value, sources) -> bool:
        """jsonschema's verdict on `value` against all of `sources` (raw subschemas of the root)."""
        if self._validator is None:
            import jsonschema
            from referencing import Registry, Resource
            from referencing.jsonschema import DRAFT202012

            cls = jsonschema.validators.validator_for(self.root if isinstance(self.root, dict) else {},
                                                      default=jsonschema.Draft202012Validator)
            root = {k: v for k, v in self.root.items() if k not in ("$id", "id")} if isinstance(self.root, dict) \
                else self.root
            res = Resource.from_contents(root, default_specification=DRAFT202012)
            self._validator = (cls, Registry().with_resource("urn:jaxgen:root", res))
        cls, registry = self._validator
        schema = {"allOf": [_rebase(s) for s in sources]}
        try:
            return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER).is_valid(value)
        except Exception as e:  # an unresolvable reference, an invalid keyword value
            raise Refused(f"jsonschema cannot check a value against it ({first_line(e, 120)})") from None


def _check(schema) -> None:
    """The schema against its metaschema (jsonschema's check_schema: a keyword's value of the wrong type,
    a negative minLength ...): its `$schema`'s draft, else 2020-12's, whose errors may only be the
    forms drafts 4-7 give the keywords _OLD_FORMS names (draft 4's boolean exclusiveMinimum, the tuple
    `items`: jaxgen reads those as their draft does) where the schema is valid under draft 7 or 4.
    One line naming the first error."""
    import jsonschema

    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise ValueError(f"schema.$schema: a metaschema URI must be a string, got {schema['$schema']!r:.80}")
    named = isinstance(schema, dict) and "$schema" in schema
    cls = jsonschema.validators.validator_for(schema if named else {}, default=jsonschema.Draft202012Validator)
    errors = list(cls(cls.META_SCHEMA).iter_errors(schema))
    if not errors:
        return
    keyword = lambda e: next((p for p in reversed(e.absolute_path) if isinstance(p, str)), "")
    if not named and all(keyword(e) in _OLD_FORMS for e in errors):
        for old in (jsonschema.Draft7Validator, jsonschema.Draft4Validator):
            older = list(old(old.META_SCHEMA).iter_errors(schema))
            if not older:
                return
        errors = older  # (draft 4's reading of the same schema: its error names what is wrong there)
    e = jsonschema.exceptions.best_match(errors)
    where = "schema" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
    raise ValueError(f"{where}: not a valid JSON Schema ({e.message[:160]})")


_HUGE = 1 << 31  # a count from here on is past what a regex holds (Python's parser stops at 2**32 - 1)
_OLD_FORMS = {"exclusiveMinimum", "exclusiveMaximum", "items", "additionalItems", "dependencies", "id"}


def _rebase(node):
    """A copy of `node` whose local references point into the root (urn:jaxgen:root#...)."""
    if isinstance(node, dict):
        return {k: ("urn:jaxgen:root" + v if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rebase(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


def to_regex(schema, whitespace: str | None = None, ref_depth: int = REF_DEPTH) -> str:
    """The regex of `schema` (a dict, a bool or JSON text); ValueError naming the first keyword that
    cannot be enforced exactly, or the one that makes the automaton too large."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON ({e.msg})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"schema: a JSON schema must be an object or a boolean, got {schema!r:.80}")
    _check(schema)
    for cap, depth, any_depth in SHRINK:  # the longest strings, deepest nesting whose automaton fits
        ctx = _Ctx(schema, "" if whitespace is None else whitespace, min(depth, ref_depth), cap,
                   min(any_depth, ANY_DEPTH))
        regex = _compile(schema, ctx, "schema", ())
        if regex is None:
            raise ValueError("schema: no JSON value satisfies it (within jaxgen's written form)"
                             + "".join(f"; {why}" for why in ctx.empty[:1]))
        size = _size(regex)
        if size <= SIZE_BUDGET or not (ctx.capped or ctx.recursed or ctx.opened):
            break
    if size > SIZE_BUDGET:
        worst = max(ctx.blame, default=(size, "schema", "the schema as a whole"))
        raise ValueError(f"schema: the automaton would be too large (~{size:,} states, budget "
                         f"jaxgen.schema.SIZE_BUDGET = {SIZE_BUDGET:,}); the largest part is {worst[2]} at "
                         f"{worst[1]} (~{worst[0]:,})")
    return regex


def _size(regex: str) -> int:
    """States of the regex's automaton, estimated: an ASCII character or class is 1, a class with
    non-ASCII characters 6 (UTF-8's intermediate states), a repeat {m,n} its body times max(n, m + 1),
    copies counted apart (outlines-core does not minimize the DFA)."""
    def walk(items):
        n = 0
        for op, av in items:
            if op is J._C.BRANCH:
                n += sum(walk(b) for b in av[1])
            elif op is J._C.SUBPATTERN:
                n += walk(av[3])
            elif op in (J._C.MAX_REPEAT, J._C.MIN_REPEAT):
                lo, hi, body = av
                n += walk(body) * max(lo + 1 if hi >= J._C.MAXREPEAT else hi, 1)
            elif op is J._C.IN and any(o is J._C.NEGATE or (o is J._C.RANGE and a[1] > 127)
                                       or (o is J._C.LITERAL and a > 127) for o, a in av):
                n += 6
            else:
                n += 1
        return n
    return walk(J._P.parse(regex))


def _fail(where: str, why: str):
    raise ValueError(f"{where}: {why}")


# ---- flattening: $ref, allOf and the keywords of one node merged into a flat dict ------------------
def _resolve(ref, ctx, where):
    if not isinstance(ref, str) or not ref.startswith("#"):
        _fail(where, f"'$ref' {ref!r:.80} is not a local reference (#/...): jaxgen reads no other documents")
    node = ctx.root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            _fail(where, f"'$ref' {ref!r:.80} points at nothing")
    return node


def _flat_of(node: dict, where: str) -> dict:
    """The flat form of one node's own keywords (its $ref / allOf aside)."""
    for key in node:
        if key in _REFUSED:
            _fail(where, f"JSON schema keyword {key!r} is not supported ({_REFUSED[key]})")
    # the node as jsonschema checks values against it, less what is merged or distributed with its own
    # sources: its anyOf / oneOf / if-then-else (choices) and its allOf / $ref (flattened into it). A
    # oneOf kept in a source decided its own disjointness: a value both branches admit fails the oneOf,
    # so it "proved" the branches disjoint (oneOf [boolean, enum [true]] under an allOf wrote `true`)
    distributed = ("anyOf", "oneOf", "if", "then", "else", "allOf", "$ref")
    flat = {"_sources": [{k: v for k, v in node.items() if k not in distributed}]}
    t = node.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else t if isinstance(t, list) else _fail(where, f"'type' {t!r:.60}")
        bad = [n for n in names if n not in _ATOMS - {"fraction"} | {"number"}]
        if bad:
            _fail(where, f"unknown type {bad[0]!r}")
        flat["_types"] = frozenset(a for n in names for a in _TYPE_ATOMS.get(n, {n}))
    if "enum" in node:
        if not isinstance(node["enum"], list):
            _fail(where, "'enum' must be a list")
        flat["_values"] = list(node["enum"])
    if "const" in node:
        flat["_values"] = _intersect_values(flat.get("_values"), [node["const"]])
    if "multipleOf" in node:
        m = node["multipleOf"]
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and float(m) == 1.0):
            _fail(where, f"JSON schema keyword 'multipleOf' ({m!r}) is not supported (only 1: an integer)")
        flat["_types"] = flat.get("_types", _ATOMS) & {"integer", "null", "boolean", "string", "array", "object"}
    lo, hi = node.get("minimum"), node.get("maximum")
    lo_x, hi_x = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if isinstance(lo_x, bool):  # draft 4: a flag on minimum
        lo_x = lo if lo_x else None
        lo = None if lo_x is not None else lo
    if isinstance(hi_x, bool):
        hi_x = hi if hi_x else None
        hi = None if hi_x is not None else hi
    for bound, excl, key in ((lo, False, "_lo"), (lo_x, True, "_lo"), (hi, False, "_hi"), (hi_x, True, "_hi")):
        if bound is not None:
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                _fail(where, f"a numeric bound {bound!r} is not a number")
            flat[key] = _tighter(flat.get(key), (bound, excl), key == "_lo")
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in node:
            v = node[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not float(v).is_integer():
                _fail(where, f"{key!r} must be a non-negative integer, got {v!r}")
            if v >= _HUGE:  # past what a regex can count: no value of that type is written that long
                if key.startswith("min"):
                    kind = {"minLength": "string", "minItems": "array", "minProperties": "object"}[key]
                    flat["_types"] = flat.get("_types", _ATOMS) - {kind}
                continue
            flat[key] = int(v)
    if "pattern" in node:
        flat["_patterns"] = [node["pattern"]]
    f = node.get("format")
    if isinstance(f, str) and (f in J.FORMATS or f in J.UNSUPPORTED_FORMATS):
        if f in J.UNSUPPORTED_FORMATS:
            _fail(where, f"format {f!r} is not supported (supported: {', '.join(sorted(J.FORMATS))})")
        flat["_format"] = f
    if node.get("uniqueItems") is True:
        flat["uniqueItems"] = True
    items = node.get("items")
    if "prefixItems" in node:
        flat["_prefix"] = list(node["prefixItems"])
        if "items" in node:
            flat["_rest"] = items
    elif isinstance(items, list):  # draft 4-2019 tuple form
        flat["_prefix"] = list(items)
        if "additionalItems" in node:
            flat["_rest"] = node["additionalItems"]
    elif items is not None:
        flat["_rest"] = items
    for key in ("properties", "patternProperties"):
        if key in node:
            if not isinstance(node[key], dict):
                _fail(where, f"{key!r} must be an object")
            flat[key] = dict(node[key])
    if "required" in node:
        flat["required"] = list(dict.fromkeys(node["required"]))
    for key in ("additionalProperties", "propertyNames"):
        if key in node and node[key] is not True and node[key] != {}:
            flat[key] = node[key]
    if "not" in node:
        _negate(flat, node["not"], where)
    deps = node.get("dependencies")
    if isinstance(deps, dict) and deps:
        _fail(where, "JSON schema keyword 'dependencies' is not supported (not enforced)")
    choices = [(k, node[k]) for k in ("anyOf", "oneOf") if k in node]
    if "if" in node:  # (if and then) or (not if and else), as two alternatives
        choices.append(("anyOf", [{"allOf": [node["if"], node.get("then", True)]},
                                  {"allOf": [_not_if(node["if"], where), node.get("else", True)]}]))
    for k, branches in choices:
        if not isinstance(branches, list) or not branches:
            _fail(where, f"{k!r} must be a non-empty list of schemas")
    if choices:
        flat["_choices"] = choices
    return flat


_NOT_FORMS = "not {type}, not {enum / const of strings}, not {required: [one name]} or an anyOf of those"


def _negate(flat: dict, n, where: str):
    """The forms of `not` jaxgen enforces exactly: a type removed, strings excluded, a key forbidden."""
    n = {k: v for k, v in n.items() if k not in _ANNOTATIONS} if isinstance(n, dict) else n
    if isinstance(n, dict) and set(n) == {"type"}:
        gone = _flat_of({"type": n["type"]}, where)["_types"]
        flat["_types"] = flat.get("_types", _ATOMS) - gone
    elif isinstance(n, dict) and set(n) in ({"enum"}, {"const"}) and all(
            isinstance(v, str) for v in (n["enum"] if "enum" in n else [n["const"]])):
        flat["_not_strings"] = list(n["enum"] if "enum" in n else [n["const"]])
    elif isinstance(n, dict) and set(n) == {"anyOf"} and isinstance(n["anyOf"], list) and all(
            _forbids(b) for b in n["anyOf"]):
        flat["_forbidden"] = [_forbids(b) for b in n["anyOf"]]
    elif _forbids(n):
        flat["_forbidden"] = [_forbids(n)]
    else:
        _fail(where, f"JSON schema keyword 'not' is supported as {_NOT_FORMS}; not {json.dumps(n)[:80]}")


def _not_if(cond, where):
    """The negation of an `if` of the form {properties: {k: {enum | const}}} (+ required: [k]): k
    present with another value (or, if `if` required k, also k absent)."""
    c = {k: v for k, v in cond.items() if k not in _ANNOTATIONS} if isinstance(cond, dict) else {}
    props = c.get("properties")
    k = sub = None
    if set(c) <= {"properties", "required"} and isinstance(props, dict) and len(props) == 1:
        (k, sub), = props.items()
        sub = {x: v for x, v in sub.items() if x not in _ANNOTATIONS} if isinstance(sub, dict) else {}
    if sub is None or set(sub) not in ({"enum"}, {"const"}) or c.get("required", [k]) != [k]:
        _fail(where, "JSON schema keyword 'if' is supported when it tests one property's enum / const "
                     f"(its negation is then exact); not {json.dumps(cond)[:80]}")
    other = {"required": [k], "properties": {k: {"not": sub}}}
    return {"anyOf": [{"not": {"required": [k]}}, other]} if "required" in c else other


def _forbids(n):
    """The key name a `not` branch forbids ({"required": [name]}, its properties empty), or None."""
    if not isinstance(n, dict):
        return None
    n = {k: v for k, v in n.items() if k not in _ANNOTATIONS}
    req = n.get("required")
    if set(n) - {"required", "properties", "type"} or not isinstance(req, list) or len(req) != 1:
        return None
    if n.get("type", "object") != "object" or any(v not in ({}, True) for v in n.get("properties", {}).values()):
        return None
    return req[0]


def _tighter(old, new, lower: bool):
    if old is None:
        return new
    (a, ax), (b, bx) = old, new
    if a == b:
        return a, ax or bx
    return (max if lower else min)(old, new, key=lambda x: x[0])


def _canon(v) -> str:
    """A key identifying a JSON value as jsonschema compares them (1 == 1.0, true != 1)."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(float(v)) if not float(v).is_integer() else str(int(v))
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_canon(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_canon(x) for x in v) + "]"
    return json.dumps(v)


def _intersect_values(a, b):
    if a is None:
        return list(b)
    keys = {_canon(v) for v in b}
    return [v for v in a if _canon(v) in keys]


def _merge(a: dict, b: dict, where: str) -> dict:
    """allOf of two flat nodes, as one flat node (Refused where jaxgen cannot merge exactly)."""
    out = dict(a)
    out["_sources"] = a["_sources"] + b["_sources"]
    for key, v in b.items():
        if key == "_sources":
            continue
        if key not in out:
            out[key] = v
        elif key == "_types":
            out[key] = out[key] & v
        elif key == "_values":
            out[key] = _intersect_values(out[key], v)
        elif key in ("_lo", "_hi"):
            out[key] = _tighter(out[key], v, key == "_lo")
        elif key.startswith("min"):
            out[key] = max(out[key], v)
        elif key.startswith("max"):
            out[key] = min(out[key], v)
        elif key in ("_patterns", "_choices", "_not_strings", "_forbidden"):
            out[key] = out[key] + v
        elif key == "_format":
            if out[key] != v:
                _fail(where, f"two formats ({out[key]!r}, {v!r}) in 'allOf'")
        elif key in ("_rest", "additionalProperties", "propertyNames"):
            out[key] = {"allOf": [out[key], v]}
        elif key == "required":
            out[key] = list(dict.fromkeys(out[key] + v))
        elif key == "uniqueItems":
            pass
    if "_prefix" in a and "_prefix" in b:
        n = max(len(a["_prefix"]), len(b["_prefix"]))
        pa = a["_prefix"] + [a.get("_rest", True)] * (n - len(a["_prefix"]))
        pb = b["_prefix"] + [b.get("_rest", True)] * (n - len(b["_prefix"]))
        out["_prefix"] = [{"allOf": [x, y]} for x, y in zip(pa, pb)]
    elif "_prefix" in a or "_prefix" in b:
        one, other = (a, b) if "_prefix" in a else (b, a)
        if "_rest" in other:
            out["_prefix"] = [{"allOf": [x, other["_rest"]]} for x in one["_prefix"]]
    if "patternProperties" in a and "patternProperties" in b and a["patternProperties"] != b["patternProperties"]:
        _fail(where, "'patternProperties' on two branches of 'allOf'")
    pa, pb = a.get("properties", {}), b.get("properties", {})
    if pa and pb:
        props = {}
        for name in list(pa) + [n for n in pb if n not in pa]:
            # a key one side lists is, for the other, a pattern's or an additional property
            ss = [x["properties"][name] for x in (a, b) if name in x.get("properties", {})] + \
                 [s for x in (a, b) if name not in x.get("properties", {}) for s in _schemas_for(x, name)]
            props[name] = ss[0] if len(ss) == 1 else {"allOf": ss}
        out["properties"] = props
    elif pa or pb:
        one, other = (a, b) if pa else (b, a)
        props = {}
        for n, sub in one["properties"].items():  # the other side's pattern / additional schema applies too
            more = _schemas_for(other, n)
            props[n] = {"allOf": [sub] + more} if more else sub
        out["properties"] = props
    for x, y in ((a, b), (b, a)):
        if "patternProperties" in x and "patternProperties" not in y and "additionalProperties" in y:
            _fail(where, "'patternProperties' beside another branch's 'additionalProperties' in 'allOf'")
    return out


def _schemas_for(flat: dict, name: str) -> list:
    """The schemas `flat` applies to the value of key `name` (besides nothing: an empty list)."""
    if name in flat.get("properties", {}):
        return [flat["properties"][name]]
    out = [s for p, s in flat.get("patternProperties", {}).items() if _search(p, name)]
    if not out and "additionalProperties" in flat:
        out.append(flat["additionalProperties"])
    return out


def _search(p: str, text: str) -> bool:
    try:
        return re.search(p, text) is not None
    except (re.error, OverflowError):
        raise Refused(f"'patternProperties' pattern {p!r} is not a valid regex") from None


def _flatten(node, ctx, where, refs) -> tuple[dict | bool, tuple]:
    if node is True or node == {}:
        return {"_sources": [True]}, refs
    if node is False:
        return False, refs
    if not isinstance(node, dict):
        _fail(where, f"a schema must be an object or a boolean, got {node!r:.60}")
    flat = _flat_of(node, where)
    if "$ref" in node:
        ref = node["$ref"]
        if refs.count(ref) >= 1:
            ctx.recursed = True
        if refs.count(ref) >= ctx.ref_depth:
            return False, refs  # recursion unrolled ref_depth times: this branch is empty
        target, refs = _flatten(_resolve(ref, ctx, where), ctx, f"{where}.$ref", refs + (ref,))
        if target is False:
            return False, refs
        flat = _merge(flat, target, where)
    subs = node.get("allOf", [])
    if not isinstance(subs, list):
        _fail(where, "'allOf' must be a list of schemas")
    for i, sub in enumerate(subs):
        f, refs = _flatten(sub, ctx, f"{where}.allOf[{i}]", refs)
        if f is False:
            return False, refs
        flat = _merge(flat, f, f"{where}.allOf")
    return flat, refs


# ---- compiling ------------------------------------------------------------------------------------
def _compile(node, ctx: _Ctx, where: str, refs: tuple) -> str | None:
    """The regex of `node`'s documents; None: none (an empty language)."""
    try:
        flat, refs = _flatten(node, ctx, where, refs)
        return None if flat is False else _compile_flat(flat, ctx, where, refs)
    except Refused as e:
        raise ValueError(f"{where}: {e}") from None


def _alt(regexes):
    rs = list(dict.fromkeys(r for r in regexes if r is not None))
    return None if not rs else rs[0] if len(rs) == 1 else "(?:" + "|".join(rs) + ")"


def _types_of(flat) -> frozenset:
    """The JSON types the node may take: declared, else those its keywords are about, else all."""
    if "_types" in flat:
        return flat["_types"]
    fams = {f for f, keys in _FAMILY_KEYS.items() if keys & set(flat)}
    if not fams:
        return _ATOMS
    return frozenset(a for f in fams for a in _TYPE_ATOMS.get(f, {f}))


def _compile_flat(flat: dict, ctx: _Ctx, where: str, refs: tuple) -> str | None:
    if flat.get("_choices"):
        return _choose(flat, ctx, where, refs)
    types = _types_of(flat)
    if "_values" in flat:  # enum / const: the values jsonschema accepts under the whole node
        fmt = J.FORMATS.get(flat.get("_format"), (None,))[0]  # (checked here even without jsonschema's checker)
        kept = [v for v in flat["_values"] if ctx.valid(v, flat["_sources"])
                and not (fmt and isinstance(v, str) and not re.fullmatch(fmt, v))]
        return _alt(J.escape(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in kept)
    alts = []
    if "null" in types:
        alts.append("null")
    if "boolean" in types:
        alts.append("(?:true|false)")
    if "integer" in types or "fraction" in types:
        lo, hi = flat.get("_lo", (None, False)), flat.get("_hi", (None, False))
        alts.append(J.number_range(lo[0], lo[1], hi[0], hi[1], integer="fraction" not in types,
                                   fraction="integer" not in types))
    if "string" in types:
        alts.append(_string(flat, ctx, where))
    if "array" in types:
        alts.append(_array(flat, ctx, where, refs))
    if "object" in types:
        alts.append(_object(flat, ctx, where, refs))
    return _alt(alts)


def _choose(flat, ctx, where, refs):
    """anyOf / oneOf: each branch merged with the rest of the node (the rest's own choices after)."""
    (kind, branches), rest_choices = flat["_choices"][0], flat["_choices"][1:]
    rest = {**flat, "_choices": rest_choices}
    merged = []
    for i, b in enumerate(branches):
        f, r = _flatten(b, ctx, f"{where}.{kind}[{i}]", refs)
        if f is not False:
            merged.append((i, _merge(rest, f, f"{where}.{kind}[{i}]"), r))
    if len(merged) > _MAX_ALTERNATIVES:
        _fail(where, f"{kind!r} of {len(merged)} branches (at most {_MAX_ALTERNATIVES} after distributing)")
    if kind == "oneOf":
        for x in range(len(merged)):
            for y in range(x + 1, len(merged)):
                if not _disjoint(merged[x][1], merged[y][1], ctx):
                    _fail(where, f"'oneOf' branches {merged[x][0]} and {merged[y][0]} can both match a value; make "
                                 "them disjoint (other types, enum / const values, a required property with "
                                 "disjoint values) or use anyOf")
    return _alt(_compile_flat(m, ctx, f"{where}.{kind}[{i}]", r) for i, m, r in merged)


def _disjoint(a: dict, b: dict, ctx, depth: int = 0) -> bool:
    """No document jaxgen writes for one of the flat nodes satisfies the other's schema (both ways):
    then `oneOf` over them is exactly `anyOf`."""
    return _excludes(a, b, ctx, depth) and _excludes(b, a, ctx, depth)


def _may_write(flat, name: str) -> bool:
    """Whether jaxgen may write key `name` in an object of `flat`."""
    if name in flat.get("_forbidden", []):
        return False
    if name in flat.get("properties", {}) or name in flat.get("required", []):
        return True
    if any(_search(p, name) for p in flat.get("patternProperties", {})):
        return True
    addl = flat.get("additionalProperties")
    listed = flat.get("properties") or flat.get("required")
    return not flat.get("patternProperties") and ((addl is not None and addl is not False) or (not listed and addl is None))


def _excludes(x: dict, y: dict, ctx, depth: int) -> bool:
    """Every document jaxgen writes for x fails y's schema (proved from types, values, keys)."""
    if x.get("_choices") or y.get("_choices") or depth > 4:
        return False
    types = _types_of(x) & y.get("_types", _ATOMS)  # what x writes (its inferred types) vs what y admits
    if not types:
        return True
    if "_values" in x and not any(ctx.valid(v, y["_sources"]) for v in x["_values"]):
        return True
    if "_values" in y and not any(ctx.valid(v, x["_sources"]) for v in y["_values"]):
        return True  # y admits only values x's schema (a superset of what x writes) rejects
    if types == {"object"}:
        if any(not _may_write(x, n) for n in y.get("required", [])):
            return True  # y requires a key x never writes
        for n in x.get("required", []):  # x always writes n
            if n in y.get("_forbidden", []) or (y.get("additionalProperties") is False and n not in
                                                 y.get("properties", {}) and not any(
                                                     _search(p, n) for p in y.get("patternProperties", {}))):
                return True
            if n in y.get("required", []):
                sx, sy = _schemas_for(x, n), _schemas_for(y, n)
                fx, _ = _flatten({"allOf": sx} if sx else True, ctx, "", ())
                fy, _ = _flatten({"allOf": sy} if sy else True, ctx, "", ())
                if fx is False or fy is False or _excludes(fx, fy, ctx, depth + 1):
                    return True
    return False


def _string(flat, ctx, where) -> str | None:
    lo, hi = flat.get("minLength", 0), flat.get("maxLength")
    if hi is not None and hi < lo:
        return None
    if hi is not None and ctx.long_string is not None and hi > max(lo, ctx.long_string):
        hi = max(lo, ctx.long_string)  # a shorter string satisfies maxLength too; each character costs states
    if hi is not None and hi > 32:
        ctx.capped = True
    fmt, pats = flat.get("_format"), list(dict.fromkeys(flat.get("_patterns", [])))
    if len(pats) > 1:
        _fail(where, "two 'pattern's (through allOf / $ref) on one string are not intersected; merge them")
    if fmt and pats:
        _fail(where, f"'pattern' beside format {fmt!r} is not intersected; keep one")
    if flat.get("_not_strings"):
        if fmt or pats or lo or hi is not None:
            _fail(where, "'not' {enum} beside a format, pattern or length on one string is not intersected")
        return J.string_regex(_not_in(flat["_not_strings"]))
    if fmt:
        regex = J.FORMATS[fmt][0]
        wlo, whi = J.width(regex)
        if wlo < lo or (hi is not None and whi > hi):
            _fail(where, f"format {fmt!r} beside minLength / maxLength (its strings are {wlo} to {whi} characters)")
        _blame(ctx, regex, where, f"format {fmt!r}")
        return J.string_regex(regex)
    if pats:
        try:
            content = J.pattern(pats[0], (lo, hi))
        except J.NoMatch as e:
            ctx.empty.append(f"{where}: {e}")
            return None
        except Refused as e:
            _fail(where, str(e))
        _blame(ctx, content, where, "'pattern'")
        return J.string_regex(content)
    content = J.repeat(J.CHAR, lo, hi)
    if hi is not None and hi > 16:
        _blame(ctx, content, where, f"maxLength {flat.get('maxLength')}")
    elif lo > 16:
        _blame(ctx, content, where, f"minLength {lo}")
    return J.string_regex(content)


def _blame(ctx, regex, where, what):
    ctx.blame.append((_size(regex), where, what))


def _sep(ctx, token: str) -> str:
    """A structural token with the whitespace regex on its inner sides ("[" + ws, ws + "]", ws + "," + ws)."""
    ws = ctx.ws
    return {"[": "\\[" + ws, "{": "\\{" + ws, "]": ws + "\\]", "}": ws + "\\}"}.get(token) or ws + J.escape(token) + ws


def _array(flat, ctx, where, refs) -> str | None:
    lo, hi = flat.get("minItems", 0), flat.get("maxItems")
    prefix = flat.get("_prefix", [])
    rest_schema = flat.get("_rest", True)
    if hi is not None and hi < lo:
        return None
    pre = []
    for i, s in enumerate(prefix):
        r = _compile(s, ctx, f"{where}.prefixItems[{i}]", refs)
        if r is None:
            hi = i if hi is None else min(hi, i)  # an array may stop before an impossible item
            break
        pre.append(r)
    if hi is not None and hi < lo:
        return None
    pre = pre if hi is None else pre[:hi]
    rest = None
    if hi is None or hi > len(pre):
        if "_rest" not in flat and prefix and lo <= len(pre):
            hi = len(pre)  # no `items` beside a prefix: jaxgen writes no more (sound narrowing)
        elif "_rest" not in flat:
            rest = _any(ctx, ctx.any_depth - 1)
        else:
            rest = _compile(rest_schema, ctx, f"{where}.items", refs)
        if rest is None:
            hi = len(pre) if hi is None else min(hi, len(pre))
    if hi is not None and hi < lo:
        return None
    open_, close, comma = _sep(ctx, "["), _sep(ctx, "]"), _sep(ctx, ",")
    if flat.get("uniqueItems") and (hi is None or hi > 1):
        return _unique_array(flat, ctx, where, refs, lo, hi, pre, open_, close, comma)
    if hi is not None and hi > 8:
        ctx.blame.append((hi * (_size(rest) if rest else 1), where, f"maxItems {hi}"))
    # items after the prefix: j written so far (j >= len(pre)), the rest optional past minItems
    body = ""
    if rest is not None and (hi is None or hi > len(pre)):
        n_lo = max(lo - len(pre), 0)
        n_hi = None if hi is None else hi - len(pre)
        body = J.repeat(f"(?:{comma}{rest})", n_lo, n_hi)
    for j in range(len(pre), 0, -1):  # prefix item j-1, then what follows it
        item = (comma if j > 1 else "") + pre[j - 1] + body
        body = item if j <= lo else f"(?:{item})?"
    if not pre:
        if rest is None or hi == 0:
            return open_ + close if lo == 0 else None
        n_hi = None if hi is None else hi - 1
        first = rest + J.repeat(f"(?:{comma}{rest})", max(lo - 1, 0), n_hi)
        return open_ + (first if lo > 0 else f"(?:{first})?") + close
    return open_ + body + close


def _unique_array(flat, ctx, where, refs, lo, hi, pre, open_, close, comma):
    """uniqueItems: regular only over a finite item set (written in the set's order, no repeats)."""
    rest_schema = flat.get("_rest", True)
    f, _ = _flatten(rest_schema, ctx, where, refs) if not pre else (None, None)
    values = None
    if f:
        types = _types_of(f)
        if "_values" in f:
            values = [v for v in f["_values"] if ctx.valid(v, f["_sources"])]
        elif types <= {"boolean", "null"}:
            values = [v for v in ([True, False] if "boolean" in types else []) + ([None] if "null" in types else [])
                      if ctx.valid(v, f["_sources"])]
    if values is None or len(values) > _MAX_UNIQUE_VALUES:
        _fail(where, "'uniqueItems' over an open item type is not a regular language (jaxgen enforces it when "
                     f"the items are at most {_MAX_UNIQUE_VALUES} enum / const / boolean values, or maxItems <= 1)")
    seen, distinct = set(), []
    for v in values:
        if _canon(v) not in seen:
            seen.add(_canon(v))
            distinct.append(J.escape(json.dumps(v, ensure_ascii=False, separators=(",", ":"))))
    body = _ordered([(x, False) for x in distinct], None, lo, hi, comma)
    return None if body is None else open_ + body + close


def _ordered(items, extra, lo, hi, comma, extra_distinct: bool = False, window: int | None = None) -> str | None:
    """Regex of a comma-separated subsequence of `items` [(regex, required)] in order, then any
    number of `extra` (a regex or None), with lo <= count <= hi. Extras count toward lo only once
    (one extra key when `extra_distinct`: none of the items' keys): a repeated key counts once.

    outlines-core's DFA is not minimized, so each way to reach an item would be a copy of the rest.
    Without count bounds the regex is linear: `(?:P,)?` before the first required item, or the
    left-nested form below when none is; with count bounds, the sequence before its first item
    ("not started") may begin only within the first `window` items (a sound narrowing)."""
    cap = max(lo, hi if hi is not None else 0)
    memo = {}
    first_required = next((i for i, (_, req) in enumerate(items) if req), None)
    more = "" if extra is None else f"(?:{comma}{extra})*"
    n_required = sum(req for _, req in items)
    if hi is None and lo <= 1 and first_required is None and len(items) <= 100:
        # G_k, the non-empty sequences over items 1..k: G_{k-1} (,P_k)? | P_k (left-nested: linear,
        # and deterministic, as each alternative starts with its own key)
        g = None
        for r, _ in items:
            g = r if g is None else f"(?:{g}(?:{comma}{r})?|{r})"
        if lo == 0:
            first = "" if extra is None else f"(?:{extra}{more})?"
        else:  # minProperties 1: a listed key, or one extra key that is not one of them
            first = None if extra is None or not extra_distinct else f"{extra}{more}"
        alts = [a for a in (None if g is None else g + more, first) if a is not None]
        if not alts:
            return None
        return "(?:" + "|".join(alts) + ")" if len(alts) > 1 else (alts[0] if lo else f"(?:{alts[0]})?")
    if hi is None and lo <= n_required:  # the required items make up the count
        head = "".join(f"(?:{r}{comma})?" for r, _ in items[:first_required])
        rest = "".join(f"{comma}{r}" if req else f"(?:{comma}{r})?" for r, req in items[first_required + 1:])
        return head + items[first_required][0] + rest + more

    def extras(k, started):
        room = None if hi is None else hi - k
        if extra is None or room == 0:
            return "" if k >= lo else None
        more = f"(?:{comma}{extra})"
        if k >= lo:
            return J.repeat(more, 0, room) if started else \
                f"(?:{extra}{J.repeat(more, 0, None if room is None else room - 1)})?"
        if k + 1 == lo and extra_distinct:  # one extra key makes up the count
            return (comma if started else "") + extra + J.repeat(more, 0, None if room is None else room - 1)
        return None

    def tail(i, k, started):
        key = (i, k, started)
        if key not in memo:
            if i == len(items) or (not started and window is not None and i >= window):
                memo[key] = extras(k, started)
            else:
                regex, required = items[i]
                sep = comma if started else ""
                after = tail(i + 1, min(k + 1, cap), True) if hi is None or k < hi else None
                take = None if after is None else sep + regex + after
                skip = None if required else tail(i + 1, k, started)
                if take is None or skip is None:
                    r = take if skip is None else skip
                elif started and skip == after:
                    r = f"(?:{sep}{regex})?{skip}"  # the same continuation either way: factored out
                elif skip == "":
                    r = f"(?:{take})?"
                else:
                    r = f"(?:{take}|{skip})"
                memo[key] = r
        return memo[key]
    return tail(0, 0, False)


def _key(name: str) -> str:
    return J.escape(json.dumps(name, ensure_ascii=False))


def _object(flat, ctx, where, refs) -> str | None:
    props, required = flat.get("properties", {}), flat.get("required", [])
    addl, pats, pnames = flat.get("additionalProperties"), flat.get("patternProperties", {}), flat.get("propertyNames")
    lo, hi = flat.get("minProperties", 0), flat.get("maxProperties")
    colon, comma = _sep(ctx, ":"), _sep(ctx, ",")
    forbidden = set(flat.get("_forbidden", []))
    if forbidden & set(required):
        return None
    listed = [n for n in list(props) + [r for r in required if r not in props] if n not in forbidden]
    items = []
    for name in listed:
        if not isinstance(name, str):
            _fail(where, f"property name {name!r} is not a string")
        schemas = _schemas_for(flat, name)
        if not schemas and addl is False:
            schemas = [False]
        if name in props:
            schemas += [s for p, s in pats.items() if _search(p, name)]
        if pnames is not None and not ctx.valid(name, [pnames]):
            schemas = [False]
        one = schemas[0] if len(schemas) == 1 else {"allOf": schemas} if schemas else True
        value = _compile(one, ctx, f"{where}.properties.{name}", refs)
        if value is None:
            if name in required:
                return None
            continue
        items.append((_key(name) + colon + value, name in required))
    groups = []  # (key regex, value schema) of keys beyond the listed ones
    if pats:
        if pnames is not None:
            _fail(where, "'propertyNames' beside 'patternProperties' is not enforced")
        every = list(pats.values())
        if any(_search(p, n) for p in pats for n in forbidden):
            _fail(where, "'not' forbids a key that 'patternProperties' admits; jaxgen cannot exclude it")
        for p in pats:
            overlap = [props[n] for n in props if _search(p, n)]
            try:
                key = J.string_regex(J.pattern(p))
            except J.NoMatch:  # no key jaxgen writes matches it (only control characters)
                continue
            groups.append((key, {"allOf": every + overlap}, f"{where}.patternProperties"))
    elif addl is not None and addl is not False:
        key = _free_key(ctx, where, refs, pnames, listed + sorted(forbidden))
        groups.append((key, addl, f"{where}.additionalProperties"))
    elif not listed and addl is None:  # an open object: keys and values the model picks
        key = _free_key(ctx, where, refs, pnames, sorted(forbidden))
        groups.append((key, None, where))
    extras = []
    for key, schema, at in groups:
        if key is None:
            continue
        value = _any(ctx, ctx.any_depth - 1) if schema is None else _compile(schema, ctx, at, refs)
        if value is not None:
            extras.append(key + colon + value)
    distinct = not pats or not any(_search(p, n) for p in pats for n in listed)
    body = _ordered(items, _alt(extras), lo, hi, comma, extra_distinct=distinct, window=START_WINDOW)
    if body is None:
        return None
    return _sep(ctx, "{") + body + _sep(ctx, "}")


def _free_key(ctx, where, refs, pnames, listed) -> str | None:
    """Regex of the keys an object may add: propertyNames' strings (or any), none of `listed`."""
    if pnames is not None:
        key = _compile({"allOf": [pnames, {"type": "string"}]}, ctx, f"{where}.propertyNames", refs)
        if key is None:
            return None
        if any(re.fullmatch(key, json.dumps(n, ensure_ascii=False)) for n in listed):
            _fail(where, "'propertyNames' admits a listed property's name beside additionalProperties; jaxgen "
                         "cannot exclude it")
        return key
    return J.string_regex(_not_in(listed))


def _not_in(names) -> str:
    """Content regex of the strings (JSON-encoded, jaxgen's form) other than `names`: a trie walk."""
    if not names:
        return J.repeat(J.CHAR, 0, None)
    trie: dict = {}
    for n in names:
        node = trie
        for c in n:
            node = node.setdefault(c, {})
        node[""] = {}

    def walk(node) -> str:
        kids = sorted(c for c in node if c)
        alts = [] if "" in node else [""]  # end here: not a name
        other = J.encode_set(J._complement([(ord(c), ord(c)) for c in kids]))
        if other is not None:
            alts.append(other + J.repeat(J.CHAR, 0, None))
        for c in kids:
            char = J.encode_set([(ord(c), ord(c))])
            if char is not None:  # (a control character jaxgen never writes: no string it writes goes there)
                alts.append(char + walk(node[c]))
        return "(?:" + "|".join(alts) + ")"
    return walk(trie)


def _any(ctx, depth: int) -> str:
    """Any JSON value nesting at most `depth` deep (0: scalars)."""
    ctx.opened = ctx.opened or depth > 0
    string = J.string_regex(J.repeat(J.CHAR, 0, None))
    scalar = f"(?:null|true|false|{J.NUMBER}|{string})"
    if depth <= 0:
        return scalar
    inner = _any(ctx, depth - 1)
    colon, comma = _sep(ctx, ":"), _sep(ctx, ",")
    arr = _sep(ctx, "[") + f"(?:{inner}(?:{comma}{inner})*)?" + _sep(ctx, "]")
    pair = string + colon + inner
    obj = _sep(ctx, "{") + f"(?:{pair}(?:{comma}{pair})*)?" + _sep(ctx, "}")
    return f"(?:{scalar[3:-1]}|{arr}|{obj})"


