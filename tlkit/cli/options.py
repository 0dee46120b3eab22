"""Command-line options built from the settings models (tlkit.config): one default, help text and list of choices each.

A command names the settings groups it takes (`@settings(train="finetune", backbone="backbone")`); each group's
fields become options with the model's defaults, descriptions and Literal choices, and the command receives the
group as one dict of values, which `build` turns into the model (a bad value: a one-line error naming the option).

Typer needs every command's options when the app is built, and importing pydantic and the models would add
~0.12 s to every start (`tlkit --help` takes ~0.22 s). So the options are read from settings.json, which
`python -m tlkit.cli.options` writes from the models; tests/test_cli.py fails, with that command, when it is stale.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from tlkit.errors import TlkitError

SPEC_FILE = Path(__file__).with_name("settings.json")

# group -> (settings model in tlkit.config, fields that are not options of their own)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "backbone": ("BackboneConfig", ("seed",)),  # --seed is one option for the split, the backbone and training
    "pretrain-backbone": ("PretrainBackboneConfig", ("seed",)),
    "split": ("SplitConfig", ("seed",)),
    "compute": ("ComputeConfig", ()),
    "finetune": ("TrainConfig", ("seed",)),
    "pretrain": ("PretrainConfig", ("seed", "keep")),  # a pretrain has no probe: it delivers what it trained
    "baseline": ("BaselineConfig", ("seed",)),
    "tracking": ("TrackingConfig", ()),
    "model-tracking": ("ModelTrackingConfig", ()),
    "tune": ("TuneConfig", ()),
    "evaluate": ("EvaluateConfig", ("eps",)),  # --eps: repeatable fractions such as 8/255 on the command line
    "export": ("ExportConfig", ()),
}


# ----------------------------------------------------------------------------------------------
# The spec: written from the models (imports pydantic), read at every start (does not)


def _kind(annotation) -> tuple[str, list | None, bool]:
    """A field's type as the command line takes it: (kind, choices, may be None)."""
    import types
    import typing

    args = typing.get_args(annotation)
    optional = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, choices, _ = _kind(rest[0])
            return kind, choices, optional
        if typing.get_origin(rest[0]) is list:
            return "list[float]", None, optional
        return "str", None, optional  # e.g. float | Literal["auto"], int | str: validated by the model
    if typing.get_origin(annotation) is Literal:
        return "choice", list(args), False
    if typing.get_origin(annotation) is list:
        return "list[float]", None, False
    if annotation in (bool, int, float, str):
        return annotation.__name__, None, False
    raise TypeError(f"no command-line form for {annotation!r}")


def spec_from_models() -> dict[str, list[dict[str, Any]]]:
    """Every group's options, from the models: name, flags, kind, choices, default, help."""
    from tlkit import config

    spec = {}
    for group, (model_name, skipped) in GROUPS.items():
        model = getattr(config, model_name)
        options = []
        for name, field in model.model_fields.items():
            if name in skipped:
                continue
            if not field.description:
                raise TypeError(f"{model_name}.{name} has no description: it is the option's help")
            kind, choices, optional = _kind(field.annotation)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            flag = "--" + name.replace("_", "-")
            options.append(
                {
                    "name": name,
                    "flags": extra.get("cli", [flag]),
                    "kind": kind,
                    "choices": choices,
                    "optional": optional,
                    "default": field.default,
                    "envvar": extra.get("envvar"),
                    "help": field.description + ".",
                }
            )
        spec[group] = options
    return spec


def write_spec(path: Path = SPEC_FILE) -> None:
    from tlkit.core.files import write_text

    write_text(path, json.dumps(spec_from_models(), indent=1) + "\n")


@functools.cache
def _spec() -> dict[str, list[dict[str, Any]]]:
    return json.loads(SPEC_FILE.read_text())


# ----------------------------------------------------------------------------------------------
# Options from the spec


def _parameter(option: dict[str, Any]) -> inspect.Parameter:
    kind, flags, default = option["kind"], list(option["flags"]), option["default"]
    if kind == "bool":
        name = flags[0].removeprefix("--")
        flags = [f"--{name}/--no-{name}"]
        annotation: Any = bool
    elif kind == "choice":
        annotation = Literal.__getitem__(tuple(option["choices"]))
    elif kind == "list[float]":
        annotation, default = str, None if default is None else ",".join(str(v) for v in default)
    else:
        annotation = {"int": int, "float": float, "str": str}[kind]
        if kind == "str" and default is not None:
            default = str(default)
    if option["optional"]:
        annotation = annotation | None
    return inspect.Parameter(
        option["name"],
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(*flags, envvar=option.get("envvar"), help=option["help"])],
    )


class GroupValues(dict):
    """A settings group's option values, and which of them the user gave (on the command line or in an environment
    variable) rather than left at their default: `build` passes only those, so a model's `model_fields_set` means the
    same from the command line as from a pipeline file (a default that is resolved per dataset stays unset)."""

    def __init__(self, values: dict[str, Any], *, given: set[str]):
        super().__init__(values)
        self.given = given


def _given(context: typer.Context | None, name: str) -> bool:
    if context is None:  # called as a function, not through the command line: every value counts as given
        return True
    source = context.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def settings(**groups: str | tuple[str, tuple[str, ...]]):
    """Give a command the options of settings groups: `name=group`, or `name=(group, fields)` where the fields are
    the ones to take, or with a leading '-' the ones to leave out; the command's parameter `name` receives the
    group's values as a dict."""

    def wrap(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        added: dict[str, list[inspect.Parameter]] = {}
        for target, chosen in groups.items():
            group, names = (chosen, ()) if isinstance(chosen, str) else chosen
            left_out = {n[1:] for n in names if n.startswith("-")}
            only = {n for n in names if not n.startswith("-")}
            added[target] = [
                _parameter(o) for o in _spec()[group] if o["name"] not in left_out and (not only or o["name"] in only)
            ]
        # arguments first, then the groups' options, then the command's own (the order --help lists them in)
        arguments = [p for p in own if p.default is inspect.Parameter.empty]
        options = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not inspect.Parameter.empty
        ]
        context = inspect.Parameter("_tlkit_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        parameters = arguments + [p for ps in added.values() for p in ps] + options + [context]

        @functools.wraps(func)
        def command(*args, _tlkit_context: typer.Context | None = None, **kwargs):
            for target, ps in added.items():
                kwargs[target] = GroupValues(
                    {p.name: kwargs.pop(p.name) for p in ps},
                    given={p.name for p in ps if _given(_tlkit_context, p.name)},
                )
            return func(*args, **kwargs)

        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return wrap


def build(model_name: str, values: dict[str, Any], **fixed: Any):
    """The settings model `model_name` from one group's option values (and `fixed` ones); a bad value is a
    one-line error that names its option."""
    from pydantic import ValidationError

    from tlkit import config

    model = getattr(config, model_name)
    given = getattr(values, "given", None)
    values = dict(values)
    for name, value in list(values.items()):
        if (
            model.model_fields[name].annotation is not None
            and _kind(model.model_fields[name].annotation)[0] == "list[float]"
        ):
            values[name] = _floats(name, value)
    if given is not None:  # an option left at the model's own default stays unset in it, as in a pipeline file
        values = {k: v for k, v in values.items() if k in given or v != model.model_fields[k].default}
    try:
        return model(**values, **fixed)
    except ValidationError as err:
        first = err.errors()[0]
        if not first["loc"]:  # a rule across options
            import re

            message = first["msg"].removeprefix("Value error, ")
            for name in values:
                message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
            raise TlkitError(message) from None
        option = "--" + str(first["loc"][0]).replace("_", "-")
        members = [str(e["loc"][1]) for e in err.errors() if len(e["loc"]) > 1 and e["loc"][0] == first["loc"][0]]
        if len(members) > 1:  # a union, e.g. float | Literal["auto"]
            named = {"float": "a number", "int": "a whole number", "str": "text"}
            choices = " or ".join(named.get(m, m.removeprefix("literal[").removesuffix("]")) for m in members)
            raise TlkitError(f"{option} must be {choices}; got {first.get('input')!r}") from None
        raise TlkitError(f"{option}: {first['msg']}; got {first.get('input')!r}") from None


def _floats(name: str, value: str | None) -> list[float] | None:
    if value is None or isinstance(value, list):
        return value
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise TlkitError(
            f"--{name.replace('_', '-')} takes comma-separated numbers, e.g. 1e-4,3e-4,1e-3; got {value!r}"
        ) from None


if __name__ == "__main__":
    write_spec()
    print(f"wrote {SPEC_FILE}", file=sys.stderr)
