"""The OpenAPI 3.1 document that `GET /v1/openapi.json` serves: self-contained and exact.

`schemas/openapi.json` describes the paths; it refers to the task, state and TES task schemas as
`#/components/schemas/Task`, `State` and `TesTaskRequest` without defining them. Those are built
here from the schema files themselves (`schemas/task.schema.json`, `state.schema.json`,
`tes.task.schema.json`), so each schema has one source: their `$schema` and `$id` are dropped,
their `$defs` become components of their own (`#/$defs/path` of the task schema becomes
`#/components/schemas/TaskPath`) and every `$ref` is rewritten to match. No reference is left
that a client generator, Swagger UI or a fuzzer would have to resolve outside the document.

The document also tells what this gateway accepts as it runs, so that a request valid by the
document is not refused by the site's configuration: the v1 `page_size` default and maximum come
from the config (`[gateway] page_size`, `max_page_size`); the TES ones and the exact form of a TES
`page_token` from `gateway.tes.api`; the per-task `[limits]` become maxima of the task's `cores`,
`memory` and `cputime` (and of TES `cpu_cores` and `ram_gb`); without a container runtime a task
has no `container`; TES `backend_parameters` name only the keys `[tes] backend_parameters` allows
when a request is strict. What a schema cannot say (a file:// input must exist, a path must lie
under `[paths] roots`, an image must match a `[tes] images` rule) is refused with a 400 that
names the field.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

import schemas

from .config import Config
from .tes.api import DEFAULT_PAGE_SIZE as TES_DEFAULT_PAGE_SIZE
from .tes.api import MAX_PAGE_SIZE as TES_MAX_PAGE_SIZE
from .tes.api import PAGE_TOKEN_PATTERN as TES_PAGE_TOKEN_PATTERN
from .tes.request import CPUTIME_PATTERN, GPUS_PATTERN

#: The schema files inlined as components: component name -> schema name in `schemas/`.
INLINED = {"Task": "task", "State": "state", "TesTaskRequest": "tes.task"}

#: The 11 GA4GH TES states, the one state vocabulary of both APIs.
STATES = tuple(schemas.load("state")["properties"]["code"]["enum"])

_COMPONENT = "#/components/schemas/"


def document(config: Config) -> dict[str, Any]:
    """The OpenAPI document of this gateway, for `config` (a fresh copy the caller may change)."""
    spec = copy.deepcopy(schemas.load("openapi"))
    components: dict[str, Any] = spec["components"]["schemas"]
    for component, name in INLINED.items():
        for key, schema in _inlined(component, name).items():
            if key in components:
                raise ValueError(f"schemas/openapi.json already defines the component {key}")
            components[key] = schema
    for operation in _operations(spec, "v1States"):
        _set_page_size(operation, config.page_size, config.max_page_size)
        _parameter(operation, "state")["schema"]["items"]["pattern"] = state_list_pattern()
    for operation in _operations(spec, "tesListTasks"):
        _set_page_size(operation, TES_DEFAULT_PAGE_SIZE, TES_MAX_PAGE_SIZE)
        token = _parameter(operation, "page_token")
        token["schema"]["pattern"] = f"^(?:{TES_PAGE_TOKEN_PATTERN[1:-1]})?$"  # empty: the first page
        token["description"] = "opaque: the next_page_token of the previous page (empty or absent: the first page)"
    for operation in _operations(spec, "v1Logs"):
        _parameter(operation, "tail")["schema"]["maximum"] = config.sections.streams.max_log_bytes
    _site_task(components, config)
    _site_tes(components, config)
    _check_self_contained(spec)
    return spec


def state_list_pattern() -> str:
    """The v1 `state` filter: state names in any case of ASCII letters, separated by commas (empty
    items are skipped, as the server does)."""
    names = "|".join("".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in state) for state in STATES)
    return f"^,*(?:(?:{names})(?:,+(?:{names}))*)?,*$"


def _site_task(components: dict[str, Any], config: Config) -> None:
    """The v1 task as this site accepts it: `[limits]` as maxima, `container` only with a runtime."""
    task = components["Task"]
    for field, limit in config.limits.items():
        prop = task["properties"][field]
        prop["maximum"] = min(int(prop.get("maximum", limit)), limit)
        prop["description"] += f" At most {limit} on this gateway ([limits] {field})."
    if not config.containers:
        del task["properties"]["container"], task["anyOf"], task["x-error"]["anyOf"]
        task["required"] = [*task["required"], "cmd"]
        task["description"] += " This gateway has no container runtime: a task needs a `cmd`, and has no `container`."


def _site_tes(components: dict[str, Any], config: Config) -> None:
    """The TES request as this site accepts it: `[limits]` on its resources, the allowed
    `backend_parameters` (a whole number of CPU seconds for `cputime`)."""
    resources = components["TesTaskRequestResources"]
    limits = config.limits
    if "cores" in limits:
        resources["properties"]["cpu_cores"]["maximum"] = limits["cores"]
    if "memory" in limits:
        # ram_gb is rounded up to whole MiB: the largest value that stays within the limit
        resources["properties"]["ram_gb"]["maximum"] = limits["memory"] * 1048576 / 1e9
    allowed = list(config.sections.tes.backend_parameters)
    parameters = resources["properties"]["backend_parameters"]
    defs = schemas.load("task")["$defs"]
    known = defs["options"]["properties"]
    parameters["properties"] = {}
    for key in allowed:
        if key in known:  # inlined: the option's schema with its `$ref` (a name's pattern) resolved
            option = dict(known[key])
            target = option.pop("$ref", "").rpartition("/")[2]
            parameters["properties"][key] = {**defs.get(target, {}), **option}
    if "gpus" in allowed:
        most = limits.get("gpus")
        pattern = GPUS_PATTERN if most is None or most > 64 else f"0*(?:{'|'.join(map(str, range(most + 1)))})"
        parameters["properties"]["gpus"] = {
            "type": "string", "pattern": f"^{pattern}$", "description": "the task's GPUs, each its own"
            + (f", at most {most} on this gateway" if most is not None else "")}
    if "cputime" in allowed:
        parameters["properties"]["cputime"] = {
            "type": "string", "pattern": f"^{CPUTIME_PATTERN}$",
            "description": "the task's CPU-time limit, in CPU seconds"
            + (f", at most {limits['cputime']} on this gateway" if "cputime" in limits else "")}
    if not parameters["properties"]:
        del parameters["properties"]
    parameters["description"] = ("keys this gateway supports: " + (", ".join(allowed) or "none")
                                 + "; others are ignored, or answer 400 with backend_parameters_strict")
    resources["if"] = {"required": ["backend_parameters_strict"],
                       "properties": {"backend_parameters_strict": {"const": True}}}
    resources["then"] = {"properties": {"backend_parameters": {"propertyNames": {"enum": allowed}}}}
    # inputs: a content or a url; outputs: wildcards (* ? [ in the path) with path_prefix; URLs of
    # the schemes outputs may be sent to
    components["TesTaskRequestInput"]["anyOf"] = [{"required": ["content"]}, {"required": ["url"]}]
    output = components["TesTaskRequestOutput"]
    staging = config.sections.staging
    staged = [name for name in staging.schemes if staging.http.allow_put or not name.startswith("http")]
    output["properties"]["path_prefix"]["description"] = (
        "required with wildcards in `path`: removed from each match, the rest appended to `url` (file://, and "
        f"the URL schemes the gateway stages: {', '.join(staged) or 'none here'})")
    commands = config.sections.tes.url_schemes
    schemes = sorted({*staged, *(name for name, directions in commands.items() if "put" in directions)})
    output["properties"]["url"] = {**output["properties"]["url"], "pattern": _url_pattern(["file", *schemes])}


def _url_pattern(schemes: list[str]) -> str:
    """URLs of `schemes` (any case, as urllib reads them); a file:// URL names an absolute path here."""
    def anycase(name: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in name)
    others = "".join(f"|{anycase(name)}:" for name in schemes if name != "file")
    return f"^(?:{anycase('file')}://(?:localhost)?/{others})"


def _inlined(component: str, name: str) -> dict[str, Any]:
    """The components made of the schema file `name`: itself as `component`, and its `$defs`."""
    schema = copy.deepcopy(schemas.load(name))
    schema.pop("$schema", None)
    schema.pop("$id", None)
    defs: dict[str, Any] = schema.pop("$defs", {})
    names = {key: component + key[0].upper() + key[1:] for key in defs}
    made = {component: schema, **{names[key]: value for key, value in defs.items()}}
    for value in made.values():
        _rewrite_refs(value, names)
    return made


def _rewrite_refs(node: Any, names: dict[str, str]) -> None:
    """`#/$defs/x` -> `#/components/schemas/<names[x]>`, in place."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = _COMPONENT + names[ref[len("#/$defs/"):]]
        for value in node.values():
            _rewrite_refs(value, names)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value, names)


def _operations(spec: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """The operations whose operationId is `prefix` or `prefix` + a suffix (the TES aliases)."""
    found = [operation for path in spec["paths"].values() for operation in path.values()
             if isinstance(operation, dict) and str(operation.get("operationId", "")).startswith(prefix)]
    if not found:
        raise ValueError(f"schemas/openapi.json has no operation {prefix}")
    return found


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == name:
            found: dict[str, Any] = parameter
            return found
    raise ValueError(f"operation {operation.get('operationId')} has no parameter {name}")


def _set_page_size(operation: dict[str, Any], default: int, maximum: int) -> None:
    parameter = _parameter(operation, "page_size")
    parameter["schema"].update({"minimum": 1, "maximum": maximum, "default": default})
    parameter["description"] = f"tasks per page, from 1 to {maximum} on this gateway (default {default})"


def _check_self_contained(spec: dict[str, Any]) -> None:
    """Every `$ref` must point into the document, at something that is there."""
    text = json.dumps(spec)
    for ref in set(re.findall(r'"\$ref": "([^"]*)"', text)):
        if not ref.startswith("#/"):
            raise ValueError(f"the OpenAPI document refers outside itself: {ref}")
        target: Any = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"the OpenAPI document refers to {ref}, which it does not define")
            target = target[part]
