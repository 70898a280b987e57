"""Structured output (jaxgen.constraints): regex, JSON schema and choices enforced in the compiled loop.

Contracts: every finished constrained row matches (re.fullmatch / json.loads + jsonschema); the drawn
distribution is the masked, renormalized one (chi-square against exact enumeration over whole
outputs, top-k / top-p on); an unconstrained row in a constrained batch == the same row generated
alone; n samples == prompts repeated; a 2x4 mesh == one device; another constraint of a similar
size reuses the compiled program; bad constraints are one clear ValueError before anything compiles.
"""
import itertools
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from scipy import stats

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxgen
from jaxgen import constraints as con
from jaxgen import sharding as shd
from jaxgen.cache import init_cache
from jaxgen.engine import generate_jit
from jaxgen.model import Model, forward
from tests.conftest import TINY_GEMMA, random_params
from tests.test_sampling import reference_probs


class JsonTokenizer:
    """A 64-token vocabulary for JSON and digits: single characters, words, and pieces spanning
    several grammar elements ('"}', '":', '1a'); id 0 is the end (no bytes), the rest filler."""
    PIECES = [b""] + [bytes([c]) for c in b"0123456789abc"] + [
        b"{", b"}", b"\"", b":", b",", b"[", b"]", b" ", b"true", b"false", b"null", b"\"a\"", b"ab", b"-", b"12",
        b"1a", b"\"}", b"\":", b"x", b"yz"]

    def __init__(self, V=64):
        self.tb = [self.PIECES[i] if i < len(self.PIECES) else b"q" * (1 + i % 3) for i in range(V)]
        self.stop_ids, self.vocab_size, self.bos_id, self.eos_id = (0,), V, None, 0

    def token_bytes(self):
        return self.tb

    def decode(self, ids):
        return b"".join(self.tb[int(i)] for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model():
    return Model(TINY_GEMMA, random_params(TINY_GEMMA), tokenizer=JsonTokenizer())


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path_factory.getbasetemp() / "jaxgen-cache"))


# BOUNDED's documents are at most 34 characters long (a token writes at least one): 40 tokens finish any row
BOUNDED = {"type": "object", "properties": {"a": {"enum": [1, 22, 333]}, "b": {"type": "boolean"},
                                            "c": {"type": "array", "items": {"enum": [1, "a"]}, "minItems": 1,
                                                  "maxItems": 2}},
           "required": ["a", "b"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"},
                                           "c": {"type": "array", "items": {"enum": [1, "a"]}, "minItems": 1,
                                                 "maxItems": 2}},
          "required": ["a", "b"], "additionalProperties": False}


def test_outputs_satisfy_their_constraints(model):
    """Sampled at temperature 1: every row that finished matches its constraint; most finish; the
    free row of the batch is what it is without any constraint."""
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9]]
    kw = dict(max_new_tokens=40, temperature=1.0, seed=3, n=8)
    cons = dict(regex=[r"-?[0-9]{1,3}(\.[0-9])?", None, None, None], json_schema=[None, SCHEMA, None, None],
                choices=[None, None, ["true", "ab12", "1a1"], None])
    out = jaxgen.generate(model, prompts, **kw, **cons)
    alone = {**kw, "seed": [3 * 1_000_003 + 24 + j for j in range(8)]}  # the seeds rows 24-31 had
    free = jaxgen.generate(model, [prompts[3]], **alone)
    assert [c.tokens for c in out[24:]] == [c.tokens for c in free]
    finished = [c for c in out[:24] if c.finish_reason == "stop"]
    assert len(finished) >= 20, [c.finish_reason for c in out[:24]]
    for i, c in enumerate(out[:24]):
        if c.finish_reason != "stop":
            continue
        if i < 8:
            assert re.fullmatch(r"-?[0-9]{1,3}(\.[0-9])?", c.text), c.text
        elif i < 16:
            jsonschema.validate(json.loads(c.text), SCHEMA)
        else:
            assert c.text in ("true", "ab12", "1a1")
    assert {c.text for c in out[16:24]} <= {"true", "ab12", "1a1"} and len({c.text for c in out[16:24]}) > 1


def _exact(model, prompt, regex, sp_kw):
    """{output tokens: probability} by enumeration: the masked logits of every prefix the automaton
    allows, through the numpy reference of the sampling transforms."""
    tb = model.tokenizer.token_bytes()
    table, start = con.build([regex], tb, 64, (0,))
    fwd = jax.jit(forward, static_argnames="cfg")

    def logits(seq):
        T = len(seq)
        lg, _ = fwd(model.params, jnp.asarray([seq], jnp.int32), jnp.arange(T)[None], init_cache(model.cfg, 1, T),
                    model.cfg)
        return np.asarray(lg[0, -1])

    out = {}

    def walk(seq, state, p):
        lg = logits(prompt + seq)
        row = table.next_state[state][table.token_class]
        ok = row >= 0
        ok[0] = table.accepting[state]  # the end id
        probs = reference_probs(np.where(ok, lg, -np.inf), **sp_kw)
        for t in np.nonzero(probs > 0)[0]:
            q = p * probs[t]
            if t == 0 or table.closed[row[t]]:
                out[tuple(seq + [int(t)])] = q
            else:
                walk(seq + [int(t)], int(row[t]), q)
    walk([], int(start[0]), 1.0)
    return out


@pytest.mark.parametrize("regex, sp_kw", [(r"[0-9][a-c]", dict(temperature=1.0)),
                                          (r"(1|12|ab)[0-9]?", dict(temperature=1.3, top_k=4, top_p=0.9))])
def test_sampled_outputs_follow_the_masked_distribution(model, regex, sp_kw):
    prompt = [5, 9, 2]
    exact = _exact(model, prompt, regex, sp_kw)
    assert 2 < len(exact) and abs(sum(exact.values()) - 1) < 1e-6
    draws = []
    for seed in range(2):  # 2 x 512 rows, one compiled program
        out = jaxgen.generate(model, [prompt, prompt], n=256, max_new_tokens=4, regex=regex, seed=seed, **sp_kw)
        draws += [tuple(c.tokens) for c in out]
    obs = {k: 0 for k in exact}
    for d in draws:
        assert d in exact, f"drew {d}, which has probability 0"
        obs[d] += 1
    keys = sorted(exact)
    exp = np.array([exact[k] for k in keys]) * len(draws)
    chi2 = sum((obs[k] - e) ** 2 / e for k, e in zip(keys, exp))
    p = stats.chi2.sf(chi2, len(keys) - 1)
    assert p > 1e-3, (chi2, p, {k: (obs[k], round(e, 1)) for k, e in zip(keys, exp)})


def test_greedy_n_samples_and_mesh(model):
    """Greedy constrained == argmax among the allowed tokens (a prefix of the sampled outcomes' support);
    n samples == the prompts repeated; a 2x4 mesh == one device."""
    prompts = [[1, 2], [3, 4, 5]]
    kw = dict(max_new_tokens=30, json_schema=SCHEMA, temperature=0.9, seed=4)
    ref = jaxgen.generate(model, [p for p in prompts for _ in range(3)], **kw)
    assert [c.tokens for c in jaxgen.generate(model, prompts, n=3, **kw)] == [c.tokens for c in ref]
    mesh = shd.make_mesh("data=2,model=4")
    sharded = Model(model.cfg, shd.shard_params(model.params, model.cfg, mesh), model.tokenizer, mesh=mesh)
    got = jaxgen.generate(sharded, [p for p in prompts for _ in range(3)], **kw)
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    g = jaxgen.generate(model, prompts, max_new_tokens=40, json_schema=BOUNDED)
    _assert_valid(g, BOUNDED, least=len(g))  # every document of BOUNDED fits in 40 tokens: every row ends


def test_similar_constraints_share_a_program(model, compile_counter):
    kw = dict(max_new_tokens=8, temperature=1.0)
    jaxgen.generate(model, [[1, 2]], regex=r"[0-9]{3}", **kw)
    before, size = compile_counter.count(), generate_jit._cache_size()
    for r in (r"[a-c]{2}[0-9]", r"(true|false)", r"-?[1-9]"):
        jaxgen.generate(model, [[1, 2]], regex=r, **kw)
    jaxgen.generate(model, [[3, 4]], choices=["ab", "12"], **kw)
    assert generate_jit._cache_size() == size and compile_counter.count() == before


def test_stop_strings_and_int8_weights(model):
    from jaxgen.quant import quantize_params

    out = jaxgen.generate(model, [[1, 2, 3]], n=6, max_new_tokens=30, temperature=1.0, seed=1,
                          regex=r"[0-9]+(,[0-9]+)*", stop=",")
    for c in out:  # stops at the first "," (the text cut before it) or ends as a whole number
        assert re.fullmatch(r"[0-9]+", c.text), c
    q = Model(model.cfg, quantize_params(model.params, "int8"), model.tokenizer)
    _assert_valid(jaxgen.generate(q, [[1, 2, 3]], n=8, max_new_tokens=40, temperature=1.0, json_schema=BOUNDED),
                  BOUNDED, least=8)


def _assert_valid(outs, schema, least: int):
    """At least `least` rows finished (so the check below checks something), and every row that did
    parses and validates; a row cut by the budget is a prefix the automaton could still complete."""
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert len(finished) >= least, [(c.finish_reason, c.text) for c in outs]
    for c in finished:
        jsonschema.validate(json.loads(c.text), schema)


def test_disk_cache_builds_once(model, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    tb = model.tokenizer.token_bytes()
    a = con.automaton(r"[0-9]{2}x", tb, (0,))
    assert len(list((tmp_path / "constraints").glob("*.npz"))) == 1
    con._MEMO.clear()
    monkeypatch.setattr(con, "_build", lambda *a: pytest.fail("rebuilt a cached constraint"))
    b = con.automaton(r"[0-9]{2}x", tb, (0,))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, message", [
    (dict(regex="[0-9"), "invalid regex"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(choices=[]), "choices must be a non-empty list"),
    (dict(regex="[0-9]", choices=["a"]), "at most one of regex, json_schema, choices"),
    (dict(regex=["[0-9]"] * 3), "regex has 3 entries but there are 2 prompts"),
    (dict(regex="Z+"), "no token sequence"),
    # what cannot be enforced exactly is refused, naming where (never dropped: an invalid row would pass)
    (dict(json_schema={"type": "object", "properties": {"t": {"type": "string"}, "g": {"type": "string"}},
                       "oneOf": [{"properties": {"t": {"enum": ["code"]}}, "required": ["g"]},
                                 {"properties": {"t": {"enum": ["token"]}}}]}),
     "schema: 'oneOf' branches 0 and 1 can both match"),  # t is not required: {"g": ""} matches both
    (dict(json_schema={"oneOf": [{"type": "integer"}, {"type": "number"}]}), "'oneOf' branches 0 and 1 can both match"),
    (dict(json_schema={"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
     "schema: 'uniqueItems' over an open item type"),
    (dict(json_schema={"type": "object", "properties": {"a": {"not": {"pattern": "b"}}}}),
     "schema.properties.a: JSON schema keyword 'not' is supported as"),
    (dict(json_schema={"type": "number", "maximum": 2.5}), "a number bound of 2.5"),
    (dict(json_schema={"$ref": "other.json#/x"}), "'$ref' 'other.json#/x' is not a local reference"),
    (dict(json_schema={"type": "array", "items": {"type": "integer"}, "maxItems": 5000}),
     "the largest part is maxItems 5000 at schema"),
    (dict(json_schema={"type": "string", "format": "email", "pattern": "a"}), "'pattern' beside format 'email'"),
])
def test_bad_constraints(model, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxgen.generate(model, [[1], [2]], max_new_tokens=4, **kw)


def test_rows_sharing_a_schema_compile_it_once(monkeypatch):
    """A schema given per row (a batch file's json_schema field) compiles once per distinct JSON text:
    the same dict, a copy or its JSON string reuse it; the same keys in another order do not (properties
    are written in the schema's order)."""
    from jaxgen import schema

    calls, real = [], schema.to_regex
    monkeypatch.setattr(schema, "to_regex", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(con, "_SCHEMAS", {})
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "null"}}, "required": ["x", "y"]}
    b = {"type": "object", "properties": {"y": {"type": "null"}, "x": {"type": "integer"}}, "required": ["x", "y"]}
    rows = con.row_regexes(5, json_schema=[a, dict(a), json.dumps(a), b, a])
    assert len(calls) == 2 and rows[0] == rows[1] == rows[2] == rows[4] != rows[3]
    assert re.fullmatch(rows[3], '{"y":null,"x":1}') and re.fullmatch(rows[0], '{"x":1,"y":null}')
    c = {"type": "object", "properties": {"1": {"type": "null"}}}
    con.row_regexes(1, json_schema=c)
    with pytest.raises(ValueError, match="property name 1 is not a string"):  # (the same JSON text as c)
        con.row_regexes(1, json_schema={"type": "object", "properties": {1: {"type": "null"}}})


# what outlines-core alone dropped silently (its regex builder reads one keyword per node) is enforced
ENFORCED = [
    {"type": "object", "properties": {"a": {"enum": ["x", "yz"]}, "b": {"type": "array", "items": {"enum": [1]},
                                                                          "maxItems": 1}},
     "required": ["a"], "additionalProperties": False,
     "oneOf": [{"properties": {"a": {"const": "x"}, "b": {"minItems": 1}}, "required": ["b"]},
               {"properties": {"a": {"const": "yz"}}}]},  # an object-level oneOf pinning enums (Github_easy o10012's kind)
    {"type": "string", "pattern": "^[a-c]+$", "minLength": 2, "maxLength": 4},
    {"type": "integer", "minimum": 3, "exclusiveMaximum": 12},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    {"type": "string", "enum": ["a", 1, "ab"]},
]


@pytest.mark.parametrize("schema", ENFORCED)
def test_keywords_outlines_core_dropped_are_enforced(model, schema):
    out = jaxgen.generate(model, [[1, 2, 3]], n=16, max_new_tokens=40, temperature=1.0, seed=5, json_schema=schema)
    _assert_valid(out, schema, least=4)


def test_budget_and_speculative_refusal(model, monkeypatch):
    from jaxgen import speculative

    monkeypatch.setattr(con, "MAX_CELLS", 10)
    with pytest.raises(ValueError, match="over the budget of 10 .*MAX_CELLS"):
        jaxgen.generate(model, [[1]], max_new_tokens=4, regex="[0-9]{5}")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="speculative decoding does not take a constraint"):
        speculative.generate(model, [[1]], speculative.parse("lookup,ngram=2,gamma=2"), regex="[0-9]")


# ---- a regex means what Python's re says (outlines-core reads Rust's syntax) -----------------------
# characters on which Python's and Rust's readings of \w \s \d, (?i) and (?s) differ, and the
# characters of the classes, braces and escapes below; each is one token of the test vocabulary
PROBE = ["a", "B", "_", "0", "7", " ", "\n", "\x0b", "\x1c", "\x85", "\u00a0", "\u0301", "\ufe0f", "\u200d",
         "\u203f", "\u00b2", "\u2160", "\u0660", "\U0001fbf5", "\u212a", "k", "\u017f", "s", "\u0130", "i", "I",
         "\u0131", "\uff22", "{", "}", "[", "]", ":", "&", "-", "~", "\"", "\U0001f600"]
PROBE_REGEXES = [r"\w+", r"\W", r"\s*", r"\S", r"\d\D", r"[^\W\d]", r"[\w&]", r"(?i)k", r"(?i)[a-z]s",
                 r"(?i:s)i", r"(?i)I", r"(?s).", r".", r"\{\"a\": 7}", r"a{,2}", r"0{1}}", r"[a[]", r"[]a]", r"[^]a]+",
                 r"^a|b$", r"\Aa\Z", r"(?x) a  7 # a comment [", r"(?a)\w", r"\u00b2|\U0001F600", r"\x2d|-?~",
                 # outlines-core's leftmost-first DFA dropped a later branch past an earlier one's match, a lazy
                 # repeat's longer runs, and (with the end anchor that fixed it) the regexes matching ""
                 r"a|aB", r"(a|aB)7?", r"a+?", r"(?:a|aB)+", r"a*|B", r"(|a)(B|)", r"B{0,2}?",
                 # a branch that dies after a prefix (outlines-core refuses such a dead end: "no token
                 # sequence satisfies it") and anchors Python moves inside a group (`aB|a7$` is `a(?:B|7$)`)
                 r"a[^\W\w]|B", r"(?:a7[^\s\S]?)+", r"aB|a7$", r"^a$|^aB\Z", r"(?:^a)?B"]


def _accepts(table, start, ids) -> bool:
    """Whether the automaton reads these token ids to an accepting state."""
    state = int(start)
    for t in ids:
        state = int(table.next_state[state][table.token_class[t]])
        if state < 0:
            return False
    return bool(table.accepting[state])


@pytest.mark.parametrize("regex", PROBE_REGEXES)
def test_a_regex_constraint_accepts_what_re_fullmatch_accepts(regex):
    """Every text of up to 3 probe characters: the automaton accepts it iff re.fullmatch(regex, text).
    Before, the regex went to outlines-core as it was: its Rust reader gave \\w marks and joiners, took
    \\x1c out of \\s, read "[a[]" as a nested class and refused "{" that starts no repeat."""
    tb = [b""] + [c.encode() for c in PROBE]
    table, start = con.build([con.to_regex("regex", regex)], tb, len(tb), (0,))
    for n in range(4):
        for ids in itertools.product(range(1, len(tb)), repeat=n):
            text = "".join(PROBE[i - 1] for i in ids)
            assert _accepts(table, start[0], ids) == bool(re.fullmatch(regex, text)), (regex, text)


# Random regexes (Python syntax) over characters where the engines differ or that need escaping, with
# classes, groups, inline flags, alternations, counted / lazy repeats and anchors anywhere.
_LITERALS = ["a", "B", "7", "_", " ", r"\n", "é", "-", r"\.", "k", "K", r"\-", r"\x41", r"\u00e9", r"\d", r"\w",
             r"\s", r"\D", r"\W", r"\S", "."]
_IN_CLASS = ["a", "B", "7", "_", " ", r"\n", "é", r"\-", ".", "k", "a-c", "A-Z", "0-9", r"\d", r"\w", r"\s", r"\W",
             r"\D", r"\S", "^a"]
_atom = st.sampled_from(_LITERALS) | st.sampled_from(["^", "$", r"\A", r"\Z"]) | st.builds(
    lambda neg, items: "[" + neg + "".join(items) + "]", st.sampled_from(["", "^"]),
    st.lists(st.sampled_from(_IN_CLASS), min_size=1, max_size=3))
REGEXES = st.builds(lambda flags, r: flags + r, st.sampled_from(["", "", "(?i)", "(?s)", "(?a)"]), st.recursive(
    _atom, lambda c: st.lists(c, min_size=2, max_size=3).map("".join) | st.lists(c, min_size=2, max_size=3).map("|".join)
    | st.builds(lambda g, r: g % r, st.sampled_from(["(?:%s)", "(%s)", "(?i:%s)", "(?s:%s)", "(?-i:%s)"]), c)
    | st.builds(lambda r, q: f"(?:{r}){q}", c, st.sampled_from(["?", "*", "+", "{2}", "{1,}", "{,2}", "{0,2}", "??",
                                                                   "*?", "{1,2}?", "{0}"])), max_leaves=8))
_FUZZ_CHARS = ["a", "B", "7", "_", " ", "\n", "é", "-", ".", "k", "K", "\u212a"]  # (K: the Kelvin sign)
_FUZZ_TB = [b""] + [c.encode() for c in _FUZZ_CHARS] + [b"aB", b"\xc3", b"\xa9"] + [bytes([i]) for i in range(256)]
_FUZZ_IDS = range(1, len(_FUZZ_CHARS) + 4)  # the texts: sequences of these tokens (the bytes make the rest writable)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(regex=REGEXES)
def test_random_regexes_accept_what_re_fullmatch_accepts(regex):
    """The automaton accepts a token sequence iff its bytes are UTF-8 text re.fullmatch accepts (every
    sequence of up to 3 tokens, halves of a character included), or the regex is refused with one
    of the documented reasons. An offline run of this found the dead branches and the anchors
    inside groups (test_a_regex_constraint_accepts_what_re_fullmatch_accepts keeps those)."""
    try:
        re.compile(regex)
    except re.error:
        return
    try:
        table, start = con.build([con.to_regex("regex", regex)], _FUZZ_TB, len(_FUZZ_TB), (0,))
    except ValueError as e:
        assert re.search("an anchor|matches no text|Possible|automaton states", str(e)), (regex, str(e))
        return
    table = con.Constraints(**{f: np.asarray(getattr(table, f)) for f in ("token_class", "next_state", "accepting",
                                                                           "closed")})
    for n in range(4):
        for ids in itertools.product(_FUZZ_IDS, repeat=n):
            try:
                text = b"".join(_FUZZ_TB[i] for i in ids).decode()
            except UnicodeDecodeError:
                text = None
            want = text is not None and re.fullmatch(regex, text) is not None
            assert _accepts(table, start[0], ids) == want, (regex, text)


@pytest.mark.parametrize("regex, message", [
    (r"[[:digit:]]", "Possible nested set at position 1"), (r"[a-z&&[^x]]", "Possible set intersection"),
    (r"[+--]", "Possible set difference"), (r"a\bc", "an anchor or word boundary inside"), (r"(?=a)a", "a lookahead"),
    (r"(a)\1", "a back-reference"), (r"a*+", "a possessive repeat"), (r"(?>a)", "an atomic group"),
    (r"a^b", "an anchor"), (r"(?:a$)+", "an anchor"), (r"a[^\s\S]", "matches no text"),
    (r"a{99999999999}", "the repetition number is too large")])  # (was an OverflowError)
def test_regexes_read_two_ways_or_not_regular_are_refused(regex, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        con.to_regex("regex", regex)


def test_choices_that_prefix_one_another_are_all_written(model):
    """choices=["a", "ab"] wrote "a" only (the automaton had no "ab"), the JSON number enum [1, 12] at
    the top of a schema lost 12, an integer in [0, 150] had one digit: each is now written whole."""
    out = jaxgen.generate(model, [[1, 2]], n=32, max_new_tokens=4, temperature=1.0, seed=1,
                          choices=["1", "12", "12a"])
    assert {c.text for c in out if c.finish_reason == "stop"} == {"1", "12", "12a"}
    out = jaxgen.generate(model, [[1, 2]], n=32, max_new_tokens=4, temperature=1.0, seed=1,
                          json_schema={"enum": [1, 12]})
    assert {c.text for c in out if c.finish_reason == "stop"} == {"1", "12"}
    # an integer range at the top: (the digits of) 0-9 | 10-99 | 100-150, whose first branch ended every row
    schema = {"type": "integer", "minimum": 0, "maximum": 150}
    out = jaxgen.generate(model, [[1, 2]], n=32, max_new_tokens=4, temperature=1.0, seed=1, json_schema=schema)
    finished = [c.text for c in out if c.finish_reason == "stop"]
    assert all(0 <= int(t) <= 150 for t in finished) and {len(t) for t in finished} >= {1, 2}


def test_json_whitespace_is_read_by_python_and_writes_json_whitespace():
    array = {"type": "array"}
    assert con.to_regex("json_schema", array, r"\n|\t") == con.to_regex("json_schema", array, "[\t\n]")
    with pytest.raises(ValueError, match=r"also writes U\+000B: JSON's whitespace is space"):
        con.to_regex("json_schema", {"type": "array"}, r"\s*")  # Python's \s: \x0b, \x1c, ... (not JSON)
    built = con.to_regex("regex", r"\w")
    assert con.to_regex("regex", built) is built  # a front end's built regex is passed on as it is


# ---- command line and batch (test_cli's tiny llama checkpoint, byte-level vocabulary) -----------
from tests.test_cli import ckpt  # noqa: E402,F401  (module-scoped fixture)


def test_cli_flags_equal_the_api(ckpt, tmp_path, capsys):
    from jaxgen import cli
    from jaxgen.checkpoint import registry

    ck = str(ckpt[2])
    m = registry.load(ck)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                  "additionalProperties": False}))
    base = ["generate", "the cat", "--model", ck, "--json", "--max-new-tokens", "24", "--temperature", "1",
            "--seed", "2"]
    for flags, kw in ((["--regex", "[a-z]{2,6}"], dict(regex="[a-z]{2,6}")),
                      (["--json-schema", str(schema)], dict(json_schema=schema.read_text())),
                      (["--choice", "yes", "--choice", "no"], dict(choices=["yes", "no"]))):
        assert cli.main(base + flags) == 0
        row = json.loads(capsys.readouterr().out)
        ref = jaxgen.generate(m, ["the cat"], max_new_tokens=24, temperature=1.0, seed=2, **kw)[0]
        assert row["tokens"] == ref.tokens and row["text"] == ref.text, flags
    assert cli.main(base + ["--regex", "[0-"]) == 2
    assert "invalid regex" in capsys.readouterr().err
    assert cli.main(base + ["--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_batch_fields_refill_and_static(ckpt, tmp_path, capsys):
    """regex / json_schema / choices rows (and free rows) in one file: refill (one table for the run)
    == static batches == the API row by row; bad constraint fields are errors with their line."""
    from jaxgen import cli
    from jaxgen.batch import row_seed
    from jaxgen.checkpoint import registry

    ck = str(ckpt[2])
    m = registry.load(ck)
    rows = [{"id": 0, "prompt": "a", "regex": "[0-9]{2,4}"}, {"id": 1, "prompt": "the", "choices": ["up", "down"]},
            {"id": 2, "prompt": "tea", "json_schema": {"type": "array", "items": {"type": "boolean"},
                                                        "maxItems": 3}},
            {"id": 3, "prompt": "hot"}, {"id": 4, "prompt": "cat", "regex": "[0-9]{2,4}"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["batch", "--input", str(inp), "--model", ck, "--max-new-tokens", "16", "--temperature", "1",
            "--batch-size", "2"]
    outs = {}
    for mode in ("--refill", "--no-refill"):
        out = tmp_path / f"{mode}.jsonl"
        assert cli.main(base + ["--output", str(out), mode]) == 0
        outs[mode] = {r["id"]: r for r in map(json.loads, open(out))}
    for r in rows:
        kind = next((k for k in ("regex", "json_schema", "choices") if k in r), None)
        ref = jaxgen.generate(m, [r["prompt"]], max_new_tokens=16, temperature=1.0, seed=[row_seed(0, r["id"])],
                              **({kind: r[kind]} if kind else {}))[0]
        assert outs["--refill"][r["id"]]["tokens"] == outs["--no-refill"][r["id"]]["tokens"] == ref.tokens, r
    assert re.fullmatch("[0-9]{2,4}", outs["--refill"][0]["text"]) or outs["--refill"][0]["finish_reason"] == "length"
    inp.write_text(json.dumps({"id": 9, "prompt": "a", "regex": "("}) + "\n")
    assert cli.main(base + ["--output", str(tmp_path / "bad.jsonl")]) == 2
    assert "in.jsonl:1: id 9: invalid regex" in capsys.readouterr().err
