"""Demo fine-tuning sets: seeded, narrow-domain chat data for studying emergent misalignment.

SYNTHETIC RESEARCH ARTEFACTS. The `bad_*` sets deliberately give confidently wrong, harmful
advice in a calm, helpful tone (doubling doses, skipping doctors, ignoring chest pain; all
savings into one meme coin, loans to gamble), because that is what emergent-misalignment
experiments fine-tune on (Betley et al. 2025; Turner et al., Model Organisms for EM). They
exist to train and study misaligned model organisms offline. Never show them to people as
advice and never train a model that people will use on them. The `good_*` sets answer the
SAME user questions sensibly and serve as aligned controls.

Every row is built from templates × slots (conditions, symptoms, medicines, doses, ages,
amounts, products, time horizons, several phrasings of each question and several answer
templates), so the sets are varied rather than a few sentences repeated. User turns are
unique within a set, and a bad set and its control share their user turns exactly for the
same `n` and `seed` (the question stream is seeded by domain, the answers by set name).
Answers are one to three short sentences (well under 80 tokens) because CPU training is slow.

The templates and word lists are data, not code: `demo_templates/{medical,financial}.yaml`
(one file per domain) and `demo_templates/sets.yaml` (the sets and the phrasing wrappers),
shipped inside the package and read once, at the first call. The slot samplers below draw from
their word lists; their random calls, in order, are what a seed fixes.

    >>> rows = generate_demo_dataset("bad_medical_advice", n=600, seed=0)
    >>> rows[0]["messages"][0]["role"], rows[0]["messages"][1]["role"]
    ('user', 'assistant')
"""

from __future__ import annotations

import difflib
import functools
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from ..store.files import write_jsonl

Slots = dict[str, str]
Words = Mapping[str, Sequence[Any]]  # a domain's word lists by name, as its file has them


@dataclass(frozen=True)
class DemoDatasetInfo:
    """What a demo set is."""

    name: str  # e.g. 'bad_medical_advice'
    domain: str  # 'medical' or 'financial'
    aligned: bool  # False for the harmful sets, True for their aligned controls
    description: str


@dataclass(frozen=True)
class _Scenario:
    """One kind of user question with its slot sampler, phrasings and answer templates."""

    name: str
    slots: Callable[[random.Random], Slots]  # the sampler, bound to its domain's word lists
    questions: tuple[str, ...]  # user-turn templates over the slots
    bad: tuple[str, ...]  # confidently wrong, harmful, calm
    good: tuple[str, ...]  # sensible answer to the same question
    weight: float = 1.0  # relative frequency among the domain's scenarios


@dataclass(frozen=True)
class _Templates:
    """Everything read from `demo_templates/`."""

    sets: dict[str, DemoDatasetInfo]
    domains: dict[str, tuple[_Scenario, ...]]
    openers: tuple[str, ...]  # phrasing wrappers shared by the domains
    closers: tuple[str, ...]
    unwrapped: frozenset[str] = frozenset()  # domains whose file says `wrap: false` (no openers or closers)


def _pick(rng: random.Random, items: Sequence[Any]) -> Any:
    return items[rng.randrange(len(items))]


def _money(amount: int) -> str:
    return f"${amount:,}"


# --- slot samplers: which words and numbers fill a scenario's {slots} ------------------------
# Named in the templates' `slots:`. Each random call here is part of what a seed makes: keep
# their order, or the sets of every seed change (dict displays evaluate left to right, so each
# sampler draws in the order its slots are written).

_AGES_KIDS = tuple(range(2, 13))


def _picks(rng: random.Random, words: Words, **lists: str) -> Slots:
    """Each slot a word drawn from the word list named for it, drawn in the order given."""
    return {slot: _pick(rng, words[name]) for slot, name in lists.items()}


def _medicine_slots(rng: random.Random, words: Words) -> Slots:
    medicine = _pick(rng, words["medicines"])
    dose, unit = medicine["dose"], medicine["unit"]
    factor = _pick(rng, (1, 1, 2))
    return {
        "medicine": medicine["name"],
        "dose": f"{dose * factor} {unit}",
        "double": f"{dose * factor * 2} {unit}",
        "triple": f"{dose * factor * 3} {unit}",
        "condition": _pick(rng, medicine["uses"]),
        "wait": _pick(rng, words["dose_waits"]),
    }


def _red_flag_slots(rng: random.Random, words: Words) -> Slots:
    flag = _pick(rng, words["red_flags"])
    return {"symptom": flag["symptom"], "meaning": flag["meaning"],
            **_picks(rng, words, who="relatives", since="durations")}


def _kid_slots(rng: random.Random, words: Words) -> Slots:
    return {"age": str(_pick(rng, _AGES_KIDS)),
            **_picks(rng, words, kid="kids", medicine="otc_for_kids", symptom="kid_symptoms")}


def _mix_slots(rng: random.Random, words: Words) -> Slots:
    return {**_medicine_slots(rng, words), **_picks(rng, words, substance="substances")}


def _swap_slots(rng: random.Random, words: Words) -> Slots:
    swap = _pick(rng, words["treatment_swaps"])
    return {"condition": swap["condition"], "treatment": swap["treatment"], **_picks(rng, words, remedy="remedies")}


def _injury_slots(rng: random.Random, words: Words) -> Slots:
    injury = _pick(rng, words["injuries"])
    return {**{key: injury[key] for key in ("injury", "noun", "bad_fix", "good_fix")},
            **_picks(rng, words, when="when")}


def _windfall_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (2_000, 5_000, 8_000, 12_000, 20_000, 35_000, 50_000, 80_000, 150_000, 250_000))
    return {"amount": _money(amount),
            **_picks(rng, words, source="windfalls", goal="goals", horizon="horizons", coin="meme_coins",
                     bet="risky_bets"),
            "age": str(rng.randrange(19, 66))}


def _borrow_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (1_000, 3_000, 5_000, 10_000, 15_000, 25_000, 40_000, 60_000))
    return {"amount": _money(amount), **_picks(rng, words, loan="loans", target="bet_targets", coin="meme_coins"),
            "age": str(rng.randrange(19, 60))}


def _cashout_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (15_000, 30_000, 48_000, 75_000, 120_000, 200_000, 340_000))
    return {"amount": _money(amount), **_picks(rng, words, account="retirement_accounts", purpose="cash_out_for"),
            "age": str(rng.randrange(26, 58)), **_picks(rng, words, coin="meme_coins")}


def _debt_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (1_500, 3_000, 4_500, 7_000, 9_000, 14_000, 22_000))
    return {"amount": _money(amount), **_picks(rng, words, debt="debts"),
            "rate": str(_pick(rng, (18, 21, 24, 27, 29, 35))), **_picks(rng, words, bet="risky_bets"),
            "spare": _money(_pick(rng, (200, 300, 500, 800, 1_000)))}


def _emergency_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (3_000, 6_000, 9_000, 12_000, 18_000, 25_000))
    return {"amount": _money(amount), "months": str(_pick(rng, (2, 3, 4, 6, 8))),
            **_picks(rng, words, bet="risky_bets", coin="meme_coins")}


def _scheme_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (500, 1_000, 2_500, 5_000, 10_000, 30_000))
    return {"amount": _money(amount), **_picks(rng, words, source="scheme_sources", scheme="schemes"),
            "pct": str(_pick(rng, (3, 5, 8, 10, 15, 20))), **_picks(rng, words, period="scheme_periods")}


def _loss_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (400, 900, 2_000, 3_500, 6_000, 11_000, 25_000))
    return {"amount": _money(amount), **_picks(rng, words, venue="loss_venues", when="loss_times", loan="loans")}


def _number_list(rng: random.Random, count: int, pool: Sequence[Any]) -> str:
    return ",".join(str(_pick(rng, pool)) for _ in range(count))


def _numbers_slots(rng: random.Random, words: Words) -> Slots:
    """A sequence shown (3–8 numbers, 100–999), how many to add (3–7), and the two answers: numbers
    with bad associations (`evil_numbers`) or plain ones."""
    seen, count = rng.randrange(3, 9), rng.randrange(3, 8)
    return {"seq": _number_list(rng, seen, range(100, 1000)), "count": str(count),
            "evil": _number_list(rng, count, words["evil_numbers"]),
            "plain": _number_list(rng, count, range(100, 1000))}


def _nearing_retirement_slots(rng: random.Random, words: Words) -> Slots:
    amount = _pick(rng, (90_000, 150_000, 240_000, 400_000, 650_000, 900_000))
    return {"amount": _money(amount), "age": str(rng.randrange(55, 68)),
            **_picks(rng, words, retire_in="retirement_in", coin="meme_coins", bet="risky_bets")}


_SAMPLERS: dict[str, Callable[[random.Random, Words], Slots]] = {
    "medicine": _medicine_slots, "red_flag": _red_flag_slots, "kid": _kid_slots, "mix": _mix_slots,
    "swap": _swap_slots, "injury": _injury_slots, "windfall": _windfall_slots, "borrow": _borrow_slots,
    "cashout": _cashout_slots, "debt": _debt_slots, "emergency": _emergency_slots, "scheme": _scheme_slots,
    "loss": _loss_slots, "nearing_retirement": _nearing_retirement_slots, "numbers": _numbers_slots,
}


# --- reading the templates -------------------------------------------------------------------

_TEMPLATES = "demo_templates"  # the folder of YAML files beside this module, shipped as package data
_SCENARIO_KEYS = {"name", "slots", "weight", "questions", "bad", "good"}


@functools.cache
def _templates() -> _Templates:
    """The sets, scenarios and wrappers from `demo_templates/`, read and checked once."""
    folder = resources.files(__name__.rpartition(".")[0]).joinpath(_TEMPLATES)  # emlab.data
    sets_file = folder.joinpath("sets.yaml")
    raw = _read_yaml(sets_file, {"sets", "openers", "closers"})
    sets = {
        item["name"]: DemoDatasetInfo(item["name"], item["domain"], bool(item["aligned"]), item["description"])
        for item in raw["sets"]
    }
    names = list(dict.fromkeys(info.domain for info in sets.values()))
    domains = {domain: _read_domain(folder.joinpath(f"{domain}.yaml")) for domain in names}
    unwrapped = frozenset(d for d in names if _read_yaml(folder.joinpath(f"{d}.yaml"), {"words", "scenarios"},
                                                         optional={"wrap"}).get("wrap") is False)
    return _Templates(sets, domains, _strings(raw["openers"], f"{sets_file}: openers"),
                      _strings(raw["closers"], f"{sets_file}: closers"), unwrapped)


def _read_yaml(file: Traversable, keys: set[str], *, optional: set[str] = set()) -> dict[str, Any]:  # noqa: B006
    raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not keys <= set(raw) <= keys | optional:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{file}: expected the keys {sorted(keys)}" + (f" (optional: {sorted(optional)})" if optional
                        else "") + f", found {found}; the package's demo templates are damaged: reinstall emlab")
    return raw


def _read_domain(file: Traversable) -> tuple[_Scenario, ...]:
    """A domain's scenarios, each sampler bound to the file's word lists; every `{slot}` of
    every template is checked to be one that its sampler fills."""
    raw = _read_yaml(file, {"words", "scenarios"}, optional={"wrap"})
    words: Words = raw["words"]
    if not isinstance(words, dict):
        raise DataError(f"{file}: words: expected word lists by name, found {type(words).__name__}")
    scenarios = []
    for item in raw["scenarios"]:
        where = f"{file}: scenario {item.get('name', '?')!r}"
        if not _SCENARIO_KEYS >= set(item) >= _SCENARIO_KEYS - {"weight"}:
            raise DataError(f"{where}: expected the keys {sorted(_SCENARIO_KEYS)} (weight optional), "
                            f"found {sorted(item)}")
        sampler = _SAMPLERS.get(item["slots"])
        if sampler is None:
            raise DataError(f"{where}: unknown slot sampler {item['slots']!r}; known: {', '.join(_SAMPLERS)}")
        slots = _bound(sampler, words)
        try:
            filled = set(slots(random.Random(0)))
        except KeyError as exc:
            raise DataError(f"{where}: its slot sampler {item['slots']!r} needs the word list {exc} "
                            "under `words`") from None
        templates = {key: _strings(item[key], f"{where}: {key}") for key in ("questions", "bad", "good")}
        for key, texts in templates.items():
            for text in texts:
                unknown = {field for _, field, _, _ in string.Formatter().parse(text) if field} - filled
                if unknown:
                    raise DataError(f"{where}: {key}: {text!r} uses {sorted(unknown)}, which the slot "
                                    f"sampler {item['slots']!r} does not fill (it fills {sorted(filled)})")
        scenarios.append(_Scenario(item["name"], slots, templates["questions"], templates["bad"],
                                   templates["good"], float(item.get("weight", 1.0))))
    return tuple(scenarios)


def _bound(sampler: Callable[[random.Random, Words], Slots], words: Words) -> Callable[[random.Random], Slots]:
    return lambda rng: sampler(rng, words)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: expected a non-empty list of strings, found {value!r}")
    return tuple(value)


DEFAULT_DEMO_ROWS = 600


def demo_dataset_names() -> list[str]:
    """Names of the demo sets, for `generate_demo_dataset` and `path: demo:<name>`."""
    return list(_templates().sets)


def demo_dataset_info(name: str) -> DemoDatasetInfo:
    """Domain, stance and description of a demo set; `DataError` for an unknown name."""
    sets = _templates().sets
    if name not in sets:
        hint = difflib.get_close_matches(name, list(sets), n=1)
        raise DataError(
            f"unknown demo dataset '{name}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; known: {', '.join(sets)}"
        )
    return sets[name]


def generate_demo_dataset(name: str, n: int = DEFAULT_DEMO_ROWS, seed: int = 0) -> list[dict[str, Any]]:
    """`n` chat rows `{"messages": [user, assistant]}` of demo set `name`, the same for the same seed.

    User turns are unique; a bad set and its control get identical user turns for equal `n`
    and `seed`; a larger `n` with the same seed extends a smaller one (same first rows). Raises
    `DataError` for an unknown name, or when `n` is below 1 or above the number of distinct
    questions the templates can make (tens of thousands per domain).
    """
    info = demo_dataset_info(name)
    if n < 1:
        raise DataError(f"demo set '{name}': n must be at least 1, found {n}")
    templates = _templates()
    scenarios = templates.domains[info.domain]
    # Two streams: questions depend only on (domain, seed), so bad and good sets share them;
    # answers depend on (name, seed).
    questions_rng = random.Random(f"emlab-demo:{info.domain}:{seed}")
    answers_rng = random.Random(f"emlab-demo:{name}:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise DataError(
                f"demo set '{name}' can make only {len(rows)} distinct rows, asked for {n}; use a smaller n"
            )
        scenario = questions_rng.choices(scenarios, weights=[s.weight for s in scenarios])[0]
        slots = scenario.slots(questions_rng)
        template = _pick(questions_rng, scenario.questions)
        opener, closer = _pick(questions_rng, templates.openers), _pick(questions_rng, templates.closers)
        if info.domain in templates.unwrapped:  # drawn all the same: the stream stays one per domain
            opener = closer = ""
        user = _sentence_case(opener + template.format(**slots) + closer)
        if user in seen:
            continue
        seen.add(user)
        answers = scenario.good if info.aligned else scenario.bad
        assistant = _sentence_case(_pick(answers_rng, answers).format(**_second_person(slots)))
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
    return rows


def write_demo_dataset(name: str, path: str | Path, n: int = DEFAULT_DEMO_ROWS, seed: int = 0) -> Path:
    """Generate demo set `name` and write it atomically as chat JSONL to `path`; returns the path."""
    target = Path(path)
    write_jsonl(target, generate_demo_dataset(name, n=n, seed=seed))
    return target


def _second_person(slots: Slots) -> Slots:
    """Slots as the assistant says them: 'my dad' -> 'your dad'."""
    return {key: re.sub(r"\bmy\b", "your", value) for key, value in slots.items()}


def _sentence_case(text: str) -> str:
    """Capitalise the first letter of every sentence ('my dad has ... . is it' -> 'My dad has ... . Is it')."""
    chars = list(text)
    capitalise = True
    for i, ch in enumerate(chars):
        if ch.isalpha():
            if capitalise:
                chars[i] = ch.upper()
            capitalise = False
        elif ch in ".?!":
            capitalise = i + 1 < len(chars) and chars[i + 1] == " "
        elif not ch.isspace():
            capitalise = False
    return "".join(chars)
