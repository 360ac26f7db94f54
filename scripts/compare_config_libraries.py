"""Measure Trellis's hand-written recipe checker and `${}` resolver against the maintained libraries.

    PYTHONPATH=src:/tmp/measure_omegaconf .venv/bin/python scripts/compare_config_libraries.py

(OmegaConf is not a Trellis dependency: `pip install --target /tmp/measure_omegaconf omegaconf`.)
Prints, for the same bad inputs, the error each library gives, whether it names the file line, the key and
a did-you-mean, and the lines of code on each side; docs/design.md ("Decisions measured") records the result.

1. Type checking an SFT recipe: trellis.stages.parse_recipe (the checker in trellis.core.recipe, then
   TrlParser) vs TrlParser alone (what TRL's own scripts do) vs pydantic over the same dataclasses.
2. Pipeline references: trellis.pipeline.spec (`_resolve`) vs OmegaConf's `${}` interpolation.
3. Code size: the hand-written code vs the glue each library needs (the glue is written below, and counted).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import importlib.util
import inspect
import io
import re
import sys
import tempfile
import textwrap
import time
import typing
from pathlib import Path

import trellis  # noqa: F401  (first: it filters the import noise of torchao/bitsandbytes/TRL)
from trellis.core import recipe as recipe_module
from trellis.core.recipe import (
    Problem,
    RecipeError,
    check_recipe,
    did_you_mean,
    format_problems,
    load_recipe_file,
)
from trellis.core.tables import markdown_table
from trellis.pipeline import spec
from trellis.stages import parse_recipe, stage_of_recipe, stage_types

ROOT = Path(__file__).resolve().parent.parent

# A valid SFT recipe (it parses with every checker); each case changes one line, marked `# <-`.
BASE = """\
model_name_or_path: Qwen/Qwen2.5-0.5B
datasets:
  - path: data/sft.jsonl
    split: train
output_dir: /tmp/trellis-compare
learning_rate: 2.0e-5
lr_scheduler_type: cosine
warmup_steps: 10
max_steps: 100
model_init_kwargs:
  dtype: float32
use_cpu: true
report_to: none
"""


@dataclasses.dataclass
class Case:
    old: str  # a line of BASE
    new: str  # what the mistake makes of it
    key: str  # the key at fault, whose line an error should name
    suggestion: str | None = None  # what a did-you-mean should offer


CASES = {
    "misspelled key": Case("warmup_steps: 10", "warmup_step: 10", "warmup_step", "warmup_steps"),
    "wrong type": Case("learning_rate: 2.0e-5", "learning_rate: fast", "learning_rate"),
    "bad enum value": Case(
        "lr_scheduler_type: cosine", "lr_scheduler_type: cosin", "lr_scheduler_type", "cosine"
    ),
    "nested source key": Case("    split: train", "    splt: train", "splt", "split"),
    "list for a mapping": Case("  dtype: float32", "  - dtype: float32", "model_init_kwargs"),
}


@dataclasses.dataclass
class Outcome:
    message: str  # the first lines a user sees
    printed: str  # how much is printed: "N lines", or "traceback" for an uncaught exception
    parsed: tuple = ()  # what TrlParser made of an accepted recipe

    @property
    def accepted(self) -> bool:
        return self.message.startswith("(accepted")

    def says(self, word: str | None) -> bool:
        return word is not None and word in self.message


def lines_of(text: str) -> str:
    return f"{len(text.strip().splitlines())} lines"


def bad_recipe(case: Case, text: str = BASE) -> str:
    return text.replace(case.old, f"{case.new}  # <-", 1)


def key_line(text: str, key: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if re.match(rf"\s*(- )?{key}:", line))


def short(text: str, max_lines: int = 8) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(
        lines[:max_lines] + ([f"... (+{len(lines) - max_lines} lines)"] if len(lines) > max_lines else [])
    )


# --- 1a. Trellis --------------------------------------------------------------------------------

ACCEPTED = Outcome("(accepted)", "0 lines")


def check_with_trellis(path: str) -> Outcome:
    try:
        parse_recipe("sft", ["--config", path], check_paths=False)
    except RecipeError as error:
        return Outcome(str(error), lines_of(str(error)))
    return ACCEPTED


# --- 1b. TrlParser alone, as TRL's scripts use it ----------------------------------------------


def check_with_trl_parser(path: str) -> Outcome:
    from trl import TrlParser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = TrlParser(stage_types("sft")).parse_args_and_config(["--config", path])
    except SystemExit:  # argparse: the usage text of every option, then "error: ..."
        printed = stderr.getvalue()
        error = [line for line in printed.splitlines() if ": error: " in line]
        return Outcome("\n".join(error), lines_of(printed))
    except Exception as error:  # raised in TrlParser or a dataclass's __init__: the user sees a traceback
        return Outcome(f"{type(error).__name__}: {error}", "traceback")
    return Outcome("(accepted)", "0 lines", tuple(parsed))


# --- 1c. pydantic over the same dataclasses: the glue it needs ----------------------------------


@functools.cache
def pydantic_model(classes: tuple[type, ...], name: str = "Recipe", as_annotated: bool = False):
    """One pydantic model with the fields of the stage's dataclasses: unknown keys forbidden, nested
    sources checked as models too (only the given keys are validated: no __post_init__ runs).
    as_annotated: the annotations as they are, without the fixes that make pydantic read them as TRL does."""
    from pydantic import ConfigDict, Field, create_model

    fields, nested = {}, {}
    for cls in classes:
        nested.update(getattr(cls, "nested_items", {}))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                default = ... if required else None
                if as_annotated:
                    fields[f.name] = (hints[f.name], default)
                    continue
                name = f"{f.name}_" if f.name == "model_config" else f.name  # pydantic's own attribute
                fields[name] = (_narrowed(hints[f.name], f), Field(default, alias=f.name))
    for key, item_type in nested.items():
        fields[key] = (list[pydantic_model((item_type,), item_type.__name__, as_annotated)], None)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(name, __config__=config, **fields)


def _narrowed(hint, f: dataclasses.Field):
    """What Trellis checks beyond the annotation: a field's `choices`, and the names of `SomeEnum | str`
    (transformers' lr_scheduler_type: any string passes the annotation, TrainingArguments rejects it later)."""
    args = typing.get_args(hint) or (hint,)
    enums = [arg for arg in args if isinstance(arg, type) and issubclass(arg, enum.Enum)]
    if f.metadata.get("choices"):
        narrowed = typing.Literal[tuple(f.metadata["choices"])]
    elif enums and str in args:
        narrowed = typing.Literal[tuple(member.value for member in enums[0])] | enums[0]
    elif list[str] in args:  # `lora_target_modules: all-linear`: TRL's parser and peft take a string
        return hint | str
    else:
        return hint
    return narrowed | None if type(None) in args else narrowed


def check_with_pydantic(path: str) -> Outcome:
    """pydantic's own message (what replacing the checker with the bare library gives)."""
    from pydantic import ValidationError

    recipe, _ = load_recipe_file(path)
    try:
        pydantic_model(stage_types("sft"), as_annotated=True).model_validate(recipe)
    except ValidationError as error:
        return Outcome(str(error), lines_of(str(error)))
    return ACCEPTED


def pydantic_problems(
    recipe: dict, lines: dict, classes: tuple[type, ...], as_annotated: bool = False
) -> list[Problem]:
    """pydantic's errors with Trellis's line, key path and did-you-mean (the glue that keeps the UX)."""
    from pydantic import ValidationError

    model = pydantic_model(classes, as_annotated=as_annotated)
    try:
        model.model_validate(recipe)
    except ValidationError as error:
        problems, seen = [], set()
        for item in error.errors():
            loc = item["loc"]
            key_path = next(loc[:n] for n in range(len(loc), 0, -1) if loc[:n] in lines or n == 1)
            if key_path in seen:  # a union reports one error per member: keep the first
                continue
            seen.add(key_path)
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in key_path).lstrip(".")
            message = f"{item['msg']}, got {item['input']!r}"
            if item["type"] == "extra_forbidden":
                message = f"unknown key{did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))}"
            elif item["type"] == "literal_error":
                choices = re.findall(r"'([^']*)'", item["ctx"]["expected"])
                message += did_you_mean(str(item["input"]), choices)
            problems.append(Problem(key, message, lines.get(key_path)))
        return sorted(problems, key=lambda problem: problem.line or 0)
    return []


def _fields_at(model, loc: tuple) -> list[str]:
    for part in loc:
        if not isinstance(part, int):
            model = typing.get_args(model.model_fields[part].annotation)[0]
    return [field.alias or name for name, field in model.model_fields.items()]


def check_with_pydantic_and_glue(path: str) -> Outcome:
    problems = pydantic_problems(*load_recipe_file(path), stage_types("sft"))
    if problems:
        message = format_problems(path, problems)
        return Outcome(message, lines_of(message))
    return ACCEPTED


def every_recipe() -> list[tuple[str, str]]:
    """(path, stage kind) of every stage recipe in recipes/."""
    found = []
    for path in sorted(ROOT.glob("recipes/*/*.yaml")):
        try:
            found.append((str(path.relative_to(ROOT)), stage_of_recipe(str(path))))
        except RecipeError:  # pipeline.yaml, templates
            continue
    return found


# --- 2. `${stages.<name>.<key>}`: Trellis vs OmegaConf ------------------------------------------

PIPELINE = ROOT / "recipes/tiny/pipeline.yaml"
# name: (text in recipes/tiny/pipeline.yaml, its replacement)
REFERENCE_CASES = {
    "misspelled stage": (
        "      reward_model_path: ${stages.reward.output_dir}",
        "      reward_model_path: ${stages.rewrad.output_dir}",
    ),
    "misspelled key": (
        "      model_name_or_path: ${stages.sft.output_dir}",
        "      model_name_or_path: ${stages.sft.output_dri}",
    ),
    "later stage (a cycle)": (
        "      model_name_or_path: ${stages.pretrain.output_dir}",
        "      model_name_or_path: ${stages.dpo.output_dir}",
    ),
}


def bad_pipeline(case: str) -> str:
    old, new = REFERENCE_CASES[case]
    return PIPELINE.read_text().replace(old, new, 1)


def resolve_with_trellis(path: str) -> Outcome:
    try:
        spec.load_pipeline(path)
    except spec.PipelineError as error:
        return Outcome(str(error), lines_of(str(error)))
    return ACCEPTED


def omegaconf_stages(raw: dict) -> dict:
    """The glue: OmegaConf addresses `stages.<name>` in a mapping, so the stage list becomes one, each
    stage its recipe with the overrides applied (what `${stages.sft.output_dir}` means in Trellis)."""
    stages = {}
    for entry in raw["stages"]:
        recipe = load_recipe_file(entry["recipe"])[0] if "recipe" in entry else {}
        pipeline_keys = {key: value for key, value in entry.items() if key != "overrides"}
        stages[entry["name"]] = {**recipe, **pipeline_keys, **(entry.get("overrides") or {})}
    return stages


def resolve_with_omegaconf(path: str) -> Outcome:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        stages = omegaconf_stages(load_recipe_file(path)[0])
        resolved = OmegaConf.to_container(OmegaConf.create({"stages": stages}), resolve=True)
    except OmegaConfBaseException as error:
        return Outcome(f"{type(error).__name__}: {error}", lines_of(str(error)))
    return Outcome(
        f"(accepted: sft.model_name_or_path = {resolved['stages']['sft']['model_name_or_path']!r})", "0 lines"
    )


def omegaconf_problems(path: str) -> list[Problem]:
    """OmegaConf plus the glue that keeps Trellis's errors: the line, a did-you-mean, and references to
    earlier stages only, which OmegaConf has no notion of. It finds every reference itself, so OmegaConf
    is left with the substitution."""
    raw, lines = load_recipe_file(path)
    stages, problems = omegaconf_stages(raw), []
    for index, (name, values) in enumerate(stages.items()):
        earlier = list(stages)[:index]
        for key, value in values.items():
            line = lines.get(("stages", index, "overrides", key)) or lines.get(("stages", index, key))
            for stage, wanted in re.findall(r"\$\{stages\.([^.}]+)\.([^}]+)\}", str(value)):
                if stage not in earlier:
                    message = f"no earlier stage named {stage!r}{did_you_mean(stage, earlier)}"
                elif wanted not in stages[stage]:
                    message = f"stage {stage!r} sets no key {wanted!r}{did_you_mean(wanted, stages[stage])}"
                else:
                    continue
                problems.append(Problem(f"stages.{name}.{key}", message, line))
    return problems


def resolve_with_omegaconf_and_glue(path: str) -> Outcome:
    problems = omegaconf_problems(path)
    if problems:
        message = format_problems(path, problems)
        return Outcome(message, lines_of(message))
    return resolve_with_omegaconf(path)


# --- 3. lines of code ------------------------------------------------------------------------------


def code_lines(source: str) -> int:
    """Lines that are code: not blank, not a comment, not a docstring line."""
    tree_lines = source.splitlines()
    docstring = re.compile(r'^\s*(""".*?"""|""".*)$')
    count, in_doc = 0, False
    for line in tree_lines:
        stripped = line.strip()
        if in_doc:
            in_doc = '"""' not in stripped
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if docstring.match(line):
            in_doc = stripped.count('"""') == 1
            continue
        count += 1
    return count


def section(path: Path, start: str, end: str) -> str:
    text = path.read_text()
    return text[text.index(start) : text.index(end)]


def sources(*objects) -> str:
    return "\n".join(inspect.getsource(obj) for obj in objects)


# --- the report ------------------------------------------------------------------------------------


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    """A markdown table; True/False/None cells read yes/no/- (no did-you-mean was expected)."""
    cells = [[{True: "yes", False: "no", None: "-"}.get(cell, cell) for cell in row] for row in rows]
    print("\n" + markdown_table(header, cells))


def compare_checkers(scratch: Path) -> None:
    checkers = {
        "Trellis (parse_recipe)": check_with_trellis,
        "TrlParser alone": check_with_trl_parser,
        "pydantic": check_with_pydantic,
        "pydantic + glue": check_with_pydantic_and_glue,
    }
    base = scratch / "base.yaml"
    base.write_text(BASE)
    print(
        f"control, the valid recipe: { ({name: check(str(base)).message for name, check in checkers.items()}) }\n"
    )
    rows = []
    for name, case in CASES.items():
        text = bad_recipe(case)
        path = scratch / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        line = key_line(text, case.key)
        print(f"### {name}: {case.new.strip()}  (key {case.key!r}, line {line})")
        for checker, check in checkers.items():
            outcome = check(str(path))
            print(
                f"--- {checker} ({outcome.printed} printed):\n{textwrap.indent(short(outcome.message), '    ')}"
            )
            names_line = bool(re.search(rf"\bline {line}\b", outcome.message))
            did_you = outcome.says(case.suggestion) if case.suggestion else None
            rows.append((name, checker, names_line, outcome.says(case.key), did_you, outcome.printed))
        print()
    all_mistakes = scratch / "all.yaml"
    text = BASE
    for case in CASES.values():
        text = bad_recipe(case, text)
    all_mistakes.write_text(text)
    print(f"### all {len(CASES)} mistakes in one file: how many does each report?")
    for checker, check in checkers.items():
        print(f"--- {checker}:\n{textwrap.indent(short(check(str(all_mistakes)).message, 14), '    ')}")
    print_table(("mistake", "checker", "names its line", "names the key", "did-you-mean", "printed"), rows)


def check_every_recipe() -> None:
    """False alarms: each checker over every stage recipe in recipes/, all of which TRL accepts."""
    print("\n### every recipe in recipes/ (all valid): keys and types only")
    total, alarms = 0, {"Trellis (check_recipe)": [], "pydantic, as annotated": [], "pydantic + glue": []}
    for path, kind in every_recipe():
        recipe, lines = load_recipe_file(path)
        recipe.pop("env", None)
        total += 1
        for problem in check_recipe(recipe, stage_types(kind), lines)[1]:
            alarms["Trellis (check_recipe)"].append(f"{path}: {problem}")
        for problem in pydantic_problems(recipe, lines, stage_types(kind), as_annotated=True):
            alarms["pydantic, as annotated"].append(f"{path}: {problem}")
        for problem in pydantic_problems(recipe, lines, stage_types(kind)):
            alarms["pydantic + glue"].append(f"{path}: {problem}")
    for checker, found in alarms.items():
        print(f"--- {checker}: {len(found)} false alarms in {total} recipes")
        for line in found[:4]:
            print(f"    {line}")
        if len(found) > 4:
            kinds = collections.Counter(
                re.sub(r"^.*?line \d+: |, got .*$| \(did you mean.*$", "", line) for line in found
            )
            print(f"    ... all {len(found)}: {dict(kinds)}")
    start = time.perf_counter()
    pydantic_model.__wrapped__(stage_types("sft"))  # uncached
    print(
        f"(pydantic: building the SFT stage's model takes {time.perf_counter() - start:.2f} s on this machine)"
    )


# Values whose reading differs between checkers (each replaces one line of BASE); what TrlParser, which
# builds the dataclasses, finally makes of them is the reference.
EDGE_VALUES = [  # (line of BASE, its replacement)
    ("use_cpu: true", "use_cpu: 'yes'"),
    ("use_cpu: true", "use_cpu: 1"),
    ("max_steps: 100", "max_steps: 10.0"),
    ("max_steps: 100", "max_steps: 10.5"),
    ("max_steps: 100", "max_steps: '10'"),
    ("model_name_or_path: Qwen/Qwen2.5-0.5B", "model_name_or_path: 2024"),
    ("learning_rate: 2.0e-5", "learning_rate: 2e-5"),  # YAML 1.1 reads it as a string
]


def compare_edge_values(scratch: Path) -> None:
    print("\n### values the checkers read differently: accepted (as what) or rejected")
    rows = []
    for old, new in EDGE_VALUES:
        path = scratch / "edge.yaml"
        path.write_text(BASE.replace(old, new))
        key = new.split(":")[0]
        recipe, lines = load_recipe_file(str(path))
        checked, problems = check_recipe(recipe, stage_types("sft"), lines)
        trellis_reads = "rejected" if problems else repr(checked[key])
        found = pydantic_problems(recipe, lines, stage_types("sft"))
        model = pydantic_model(stage_types("sft")).model_validate(recipe) if not found else None
        pydantic_reads = "rejected" if found else repr(getattr(model, key))
        trl = check_with_trl_parser(str(path))
        trl_reads = (
            repr(next(getattr(o, key) for o in trl.parsed if hasattr(o, key))) if trl.accepted else "rejected"
        )
        rows.append((f"`{new}`", trellis_reads, pydantic_reads, trl_reads))
    print_table(("value", "Trellis", "pydantic + glue", "TrlParser alone"), rows)


def compare_resolvers(scratch: Path) -> None:
    print("\n## 2. `${stages.<name>.<key>}` references in recipes/tiny/pipeline.yaml")
    if importlib.util.find_spec("omegaconf") is None:
        print("skipped: OmegaConf is not installed (see this script's docstring)")
        return
    resolvers = {
        "Trellis (load_pipeline)": resolve_with_trellis,
        "OmegaConf": resolve_with_omegaconf,
        "OmegaConf + glue": resolve_with_omegaconf_and_glue,
    }
    rows = []
    for name, (_, new) in REFERENCE_CASES.items():
        text = bad_pipeline(name)
        path = scratch / f"pipeline_{name.split()[0]}_{len(rows)}.yaml"
        path.write_text(text)
        line = text.splitlines().index(new) + 1
        suggestion = {"misspelled stage": "'reward'", "misspelled key": "'output_dir'"}.get(name)
        print(f"### {name}: {new.strip()}  (line {line})")
        for resolver, resolve in resolvers.items():
            outcome = resolve(str(path))
            print(f"--- {resolver}:\n{textwrap.indent(short(outcome.message), '    ')}")
            caught = not outcome.accepted
            names_line = bool(re.search(rf"\bline {line}\b", outcome.message))
            did_you = f"did you mean {suggestion}" in outcome.message if suggestion else None
            rows.append((name, resolver, caught, names_line, did_you))
    print_table(("mistake", "resolver", "caught", "names its line", "did-you-mean"), rows)


def compare_sizes() -> None:
    print("\n## 3. Code lines (not blank, comment or docstring)")
    checker = section(Path(recipe_module.__file__), "# --- key and type checks", "# --- checks across keys")
    shared = sources(Problem, format_problems, did_you_mean, recipe_module.field_names)
    resolver = section(Path(spec.__file__), "def _resolve(", "def strings(")  # read as text: it is private
    this = sys.modules[__name__]
    rows = [
        ("Trellis: recipe key/type checker (trellis.core.recipe)", code_lines(checker)),
        ("  of which used by the rest of Trellis too (Problem, format_problems, ...)", code_lines(shared)),
        ("Trellis: `${}` resolver (spec._resolve and its pattern)", code_lines(resolver) + 1),
        ("TrlParser alone: glue", 0),
        (
            "pydantic: glue to the bare library (pydantic_model, _narrowed; 3 lines: as_annotated)",
            this.pydantic_model,
            this._narrowed,
        ),
        (
            "pydantic: + line/key/did-you-mean (pydantic_problems, _fields_at)",
            this.pydantic_problems,
            this._fields_at,
        ),
        ("OmegaConf: glue to the bare library (omegaconf_stages)", this.omegaconf_stages),
        ("OmegaConf: + line/did-you-mean/earlier stages (omegaconf_problems)", this.omegaconf_problems),
    ]
    for what, *counted in rows:
        count = counted[0] if isinstance(counted[0], int) else code_lines(sources(*counted))
        print(f"{count:5d}  {what}")


def main() -> None:
    import os

    os.chdir(ROOT)  # the pipeline's recipe paths are relative to the repository
    with tempfile.TemporaryDirectory() as scratch:
        print("## 1. The same bad SFT recipe, checked by each")
        compare_checkers(Path(scratch))
        check_every_recipe()
        compare_edge_values(Path(scratch))
        compare_resolvers(Path(scratch))
    compare_sizes()


if __name__ == "__main__":
    main()
