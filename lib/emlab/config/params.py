"""The one loader for every file under `params/`: read it safely, validate it against its
pydantic schema, and say what is wrong in one line.

    read      `store.inputs` (size cap, encoding, YAML syntax, duplicate keys, aliases, depth)
    validate  a pydantic model or TypeAdapter (`config.schemas`, `config.experiment`)
    explain   every `ValidationError` as 'file:line: key: what was expected, what was found',
              unknown keys with the nearest valid key (difflib)

    params/experiments/x.yaml:12: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)
    params/questions/t.yaml:8: 'questions[1].id': duplicate question id 'a' (first on line 6); ids must be unique

YAML files come whole (`load_params`); JSONL files row by row (`iter_params_rows`), each row
validated alone and its errors named by its line. A schema's validators raise `Problem` to
point below the model they check (a duplicate id at `questions[3].id`) or to cite the line of
another value ('first on line N'). Checks that need more than one file (a rubric built from a
question file's judge prompt) run after validation and report with `error_at`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import ConfigError, DataError, EmlabError
from ..store.inputs import (
    BOOLEAN_HINT,
    iter_input_jsonl,
    load_input_yaml,
    one_line,
    path_exists,
    shown,
)
from ..store.paths import repo_root

T = TypeVar("T")
Schema = type[BaseModel] | TypeAdapter[Any]
Loc = tuple[str | int, ...]

MAX_PROBLEMS = 5  # shown in one error line; the rest are counted
FIRST_LINE = "{first_line}"  # in a `Problem` message: replaced by the line of `Problem.first`


class Problem(ValueError):
    """A schema validator's complaint about a value below the model it checks.

    `at`: the key path from that model to the value (("questions", 3, "id")); `first`: the path
    (from the same model) of an earlier value the message cites as 'first on line
    {first_line}'. The loader turns both into line numbers of the file.
    """

    def __init__(self, message: str, *, at: Loc = (), first: Loc | None = None) -> None:
        super().__init__(message)
        self.message, self.at, self.first = message, at, first


# --- reading -------------------------------------------------------------------------------


def resolve_params_path(path: str | Path) -> Path:
    """Resolve a params path given relative to the working directory or the repository root
    (the working directory wins when something is there). Never raises: a path that cannot
    exist comes back as given, for the reader to report."""
    candidate = Path(path)
    if not (candidate.is_absolute() or path_exists(candidate)):
        candidate = repo_root() / candidate
    try:
        return candidate.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return candidate.absolute()


def params_sets(folder: str | Path) -> list[str]:
    """Names of the YAML files in `<repo>/<folder>` (a kind of params file: question sets, probe sets)."""
    found = repo_root() / folder
    return sorted(p.stem for p in found.glob("*.yaml")) if found.is_dir() else []


def find_params_set(name: str, folder: str | Path, what: str) -> Path:
    """The file of the set called `name` in `<repo>/<folder>` (or `name` itself when it is a path
    to a .yaml file, relative to the repository root). `DataError` naming where it looked and,
    for an unknown name, the nearest one."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        file = Path(name) if Path(name).is_absolute() else repo_root() / name
        if not path_exists(file):
            raise DataError(f"{one_line(name)}: {what} file not found (looked in {one_line(str(file))})")
        return file
    folder = Path(folder)
    file = repo_root() / folder / f"{name}.yaml"
    if not path_exists(file):
        known = params_sets(folder)
        hint = difflib.get_close_matches(name, known, n=1)
        raise DataError(
            f"unknown {what} {shown(name)} (no {one_line(str(folder / (name + '.yaml')))})"
            + (f"; did you mean '{hint[0]}'?" if hint else f"; sets: {', '.join(known) or 'none'}")
        )
    return file


def load_yaml(
    path: str | Path, *, what: str = "params file", error: type[EmlabError] = ConfigError
) -> tuple[Any, yaml.Node]:
    """Parse a YAML params file into data and its node tree (for line numbers in errors).

    Reads through `store.inputs.load_input_yaml`: anything malformed (not found, a folder, binary,
    not UTF-8, empty, too large, YAML syntax, aliases that explode, deep nesting, tags,
    duplicate or non-text keys, numbers out of range) raises `error` as one line naming the
    file and, where it applies, the line. `what` names the file in those messages.
    """
    file = resolve_params_path(path)
    if not path_exists(file):
        raise error(f"{one_line(str(path))}: {what} not found (looked in {one_line(str(file))})")
    try:
        return load_input_yaml(file, what=what, error=error)
    except EmlabError as exc:
        slip = _indentation_slip(file, str(exc)) if "YAML syntax error" in str(exc) else None
        if slip is None:
            raise
        raise error(slip) from None


_SYNTAX_LINE = re.compile(r":(\d+): YAML syntax error")


def _indentation_slip(file: Path, message: str) -> str | None:
    """A YAML syntax error that is an indentation slip ('   source: x' under '  - name: a') in
    plain words: which line is indented by how many spaces where how many were expected.
    PyYAML says 'expected <block end>, but found <block mapping start>', which names the
    parser's state, not the mistake. None when no line up to the error is off by one column
    from the columns open above it (the raw message then stands)."""
    found = _SYNTAX_LINE.search(message)
    if found is None:
        return None
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    columns: set[int] = {0}  # where the keys of the blocks above a line start
    previous_key_column = 0
    slip = None
    for number, line in enumerate(lines[: int(found.group(1)) + 1], 1):
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        near = [c for c in columns if abs(c - indent) == 1]
        if indent not in columns and near and indent <= previous_key_column + 1:
            slip = (number, indent, max(near))
        columns = {c for c in columns if c <= indent} | {indent}
        body = stripped
        while body.startswith("- "):  # '- name: a' opens a mapping two columns further in
            indent += 2
            body = body[2:].lstrip(" ")
            columns.add(indent)
        previous_key_column = indent
    if slip is None:
        return None
    number, indent, expected = slip
    return one_line(
        f"{file}:{number}: indentation: line {number} is indented by {indent} space{'s' * (indent != 1)} where "
        f"{expected} {'were' if expected != 1 else 'was'} expected (the keys of one mapping must line up); "
        f"indent it by {expected}"
    )


def load_params(
    path: str | Path,
    schema: Schema,
    *,
    what: str,
    error: type[EmlabError] = ConfigError,
) -> Any:
    """Read the YAML file at `path` and validate it against `schema` (a pydantic model or a
    TypeAdapter); the validated object. The schema's validators see the file's stem as
    `info.context["stem"]` (files whose `name`/`id` must match it).

    Raises `error`, one line: unreadable files as `load_yaml` does; schema problems as
    'file:line: key: problem' (see `explain`).
    """
    file = resolve_params_path(path)
    data, node = load_yaml(file, what=what, error=error)
    return validate(data, schema, file=file, node=node, error=error)


def validate(
    data: Any, schema: Schema, *, file: Path, node: yaml.Node | None, error: type[EmlabError] = ConfigError
) -> Any:
    """`data` (read from `file`, node tree `node`) validated against `schema`; `error` with
    file, line and key when it does not fit."""
    context = {"stem": file.stem, "file": file}
    try:
        if isinstance(schema, TypeAdapter):
            return schema.validate_python(data, context=context)
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        raise error(explain(exc, file, node, schema)) from None


def iter_params_rows(
    path: str | Path, schema: type[T], *, what: str, error: type[EmlabError] = ConfigError
) -> Iterator[tuple[int, T]]:
    """Yield (1-based line, validated row) for every row of a JSONL params file, each row read
    by `store.inputs.iter_input_jsonl` and validated against the model `schema`. The first
    bad row raises `error` as 'file:line: key: problem'."""
    file = Path(path)
    for number, row in iter_input_jsonl(file, what=what, error=error):
        try:
            yield number, schema.model_validate(row, context={"stem": file.stem, "file": file})  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise error(explain(exc, Path(f"{file}:{number}"), None, schema)) from None  # type: ignore[arg-type]


def error_at(
    file: Path, node: yaml.Node | None, loc: Loc, message: str, error: type[EmlabError] = ConfigError
) -> EmlabError:
    """An `error` for a problem found after validation: 'file:line: message', the line of `loc`."""
    line = yaml_line(node, loc)
    return error(one_line(f"{file}:{line}: {message}" if line else f"{file}: {message}"))


# --- explaining ----------------------------------------------------------------------------


def explain(exc: ValidationError, file: Path, node: yaml.Node | None, schema: Schema) -> str:
    """pydantic's report as one line: 'file:line: key: problem' for each problem (the first
    few, then a count), joined with '; '. Unknown keys get the nearest valid key."""
    problems = []
    errors = _relevant(exc.errors())
    for err in errors[:MAX_PROBLEMS]:
        loc: Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        first_line = None
        if isinstance(cause, Problem):
            if cause.first is not None:
                first_line = yaml_line(node, (*loc, *cause.first))
            loc = (*loc, *cause.at)
        line = yaml_line(node, loc)
        where = f"{file}:{line}" if line else str(file)
        problems.append(f"{where}: {_problem(err, loc, cause, first_line, schema)}")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    # one line, so the CLI's error stays one line even when several keys are wrong
    return one_line("; ".join(problems))


def _relevant(errors: list[Any]) -> list[Any]:
    """pydantic's errors, the telling ones first, without the echoes of another: unknown keys
    come first; a missing key is left out when an unknown key beside it is its typo; a list
    too short because its items failed is left out (the items' errors say why)."""
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    typos = {(tuple(e["loc"][:-1]), hint) for e in unknown
             for hint in difflib.get_close_matches(str(e["loc"][-1]), [str(m["loc"][-1]) for m in errors
                                                                        if m["type"] == "missing"], n=1)}
    kept = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "missing" and (loc[:-1], str(loc[-1])) in typos:
            continue
        if err["type"] == "too_short" and any(len(o["loc"]) > len(loc) and tuple(o["loc"][:len(loc)]) == loc
                                              for o in errors):
            continue
        kept.append(err)
    return sorted(kept, key=lambda e: e["type"] != "extra_forbidden")  # stable: file order otherwise


def _problem(err: Any, loc: Loc, cause: Any, first_line: int | None, schema: Schema) -> str:
    key = key_path(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(schema, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        return f"unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                                        f"; valid keys: {', '.join(valid)}" if valid else "")
    if err["type"] == "missing":
        parent = key_path(loc[:-1])
        return (f"{parent} is missing required key '{loc[-1]}'" if parent
                else f"missing required key '{loc[-1]}'")
    prefix = f"'{key}': " if key else ""
    if isinstance(cause, Problem):
        return prefix + cause.message.replace(FIRST_LINE, str(first_line))
    if err["type"] == "value_error":  # a validator's own message: it says what it found
        return prefix + str(err["msg"]).removeprefix("Value error, ")
    found = err.get("input")
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        keys = _required_at(schema, loc)
        wanted = f"a mapping with {', '.join(keys)}" if keys else "a mapping"
        return f"{prefix}expected {wanted}, found {describe(found)}"
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error":
        return f"{prefix}expected one of {ctx.get('expected', '')}, found {describe(found)}"
    if err["type"] == "too_short" and ctx.get("min_length") == 1:
        return f"{prefix}expected a non-empty list, found {describe(found)}"
    if err["type"] == "string_type":
        advice = f"; {BOOLEAN_HINT}" if isinstance(found, bool) else ""
        return f"{prefix}expected text, found {describe(found)}{advice}"
    plain = _PLAIN_TYPES.get(err["type"])
    if plain is not None:
        example = f" such as [{found}]" if plain == "a list" and isinstance(found, (int, float, str)) else ""
        return f"{prefix}expected {plain}{example}, found {describe(found)}"
    # bounds and the rest: pydantic's words say what was expected ('greater than or equal to 1')
    return f"{prefix}{err['msg']} (found {describe(found)})"


# pydantic's error types in plain words: what the key takes (pydantic says 'valid tuple' for a list)
_PLAIN_TYPES = {
    "tuple_type": "a list", "list_type": "a list", "set_type": "a list", "frozen_set_type": "a list",
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false",
}


def describe(value: Any) -> str:
    """A found value for a message: the value itself when short text or a number, its kind
    when a mapping, a list or nothing; a boolean says why YAML made it one."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "an empty list" if not value else f"a list {shown(list(value), 60)}"
    if isinstance(value, (str, int, float)):
        return shown(value, 80)
    return type(value).__name__


def key_path(loc: Loc) -> str:
    """'questions[0].text' for ("questions", 0, "text"); '[2].id' for an entry of a list file."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def yaml_line(node: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the deepest YAML node that `loc` (keys and list indices) reaches:
    the key's line for mappings, the item's for lists, the document's when nothing matches."""
    current, line = node, (node.start_mark.line + 1 if node is not None else None)
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            match = next((kv for kv in current.value if kv[0].value == part), None)
            if match is None:
                break
            line, current = match[0].start_mark.line + 1, match[1]
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and part < len(current.value):
            current = current.value[part]
            line = current.start_mark.line + 1
        else:
            break
    return line


def _model_at(schema: Schema, loc: Loc) -> Any:
    """The pydantic model that `loc` reaches from `schema` (None when it leaves the models)."""
    model: Any = _model_in(getattr(schema, "_type", None) if isinstance(schema, TypeAdapter) else schema)
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model


def _fields_at(schema: Schema, loc: Loc) -> list[str]:
    model = _model_at(schema, loc)
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _required_at(schema: Schema, loc: Loc) -> list[str]:
    model = _model_at(schema, loc)
    fields = model.model_fields.items() if hasattr(model, "model_fields") else ()
    return [name for name, field in fields if field.is_required()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside a type (`tuple[Question, ...]`, `X | None`, a RootModel's root)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        root = annotation.model_fields.get("root") if "root" in annotation.model_fields else None
        return _model_in(root.annotation) if root is not None else annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
