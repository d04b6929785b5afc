"""`atoken preprocess images|videos|3d`: one ingest job outside a pipeline run, with the pipeline's own options.

It lives in pipeline/, not preprocess/: the ingest stages fingerprint preprocess/'s source, and a change to a
flag's help must not re-ingest every data set.

The flags are not a second list: each scalar field of the stage's config section (IngestSection,
VideoIngestSection, Objects3DSection in pipeline/config.py) is a flag, `val_every` → `--val-every`, with the
field's default and, as its help, the field's comment. SOURCE is read into the same source a config lists, and
the section is type-checked and validated by the functions load_config uses, so a standalone job is the
pipeline's stage. `--config FILE [--set ...]` takes the section (and storage, ray) from a pipeline config
instead; flags and SOURCEs given beside it replace the config's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoken.pipeline.config import (
    ConfigError,
    IngestSection,
    Objects3DSection,
    PipelineConfig,
    SourceSection,
    VideoIngestSection,
    load_config,
    section_from_dict,
    validate_ingest,
    validate_objects,
    validate_videos,
)

if TYPE_CHECKING:
    from atoken.pipeline.storage import Storage

# `atoken preprocess KIND` → the config section it runs (its name in a config file, its dataclass, its checks).
SECTIONS: dict[str, tuple[str, type, Any]] = {
    "images": ("ingest", IngestSection, validate_ingest),
    "videos": ("videos", VideoIngestSection, validate_videos),
    "3d": ("objects", Objects3DSection, validate_objects),
}
LIST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")  # what preprocess.sources.list_file reads
SOURCE_HELP = ("a folder, an s3://bucket/prefix, a list file (.parquet, .csv or .jsonl, local or s3://, with a path "
               "or url column and optional caption and key columns) or builtin:NAME; several are listed in order. "
               "With --config: replaces the config's sources")
# SOURCE says these fields of a SourceSection; its other scalar fields (limit, split) are flags for every SOURCE.
SOURCE_SAID = ("kind", "name", "path")
SCALARS = (int, float, str, bool)


def scalar_fields(cls: type) -> dict[str, type]:
    """The fields of a config dataclass that one flag can set (int, float, str, bool, or optional), with types."""
    hints = typing.get_type_hints(cls)
    scalars = {}
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = options[0] if len(options) == 1 else None
        if hint in SCALARS:
            scalars[item.name] = hint
    return scalars


def add_section_arguments(parser: argparse.ArgumentParser, cls: type, where: str, skip: tuple[str, ...] = (),
                          aliases: dict[str, tuple[str, ...]] | None = None, label: str | None = None) -> None:
    """`--field-name VALUE` for every scalar field of `cls` but `skip`, stored under dest `where.field` only when
    given (its help names the field as `label.field`, default `where`). Values are read as `--set` reads them
    (YAML: `8`, `null`) and type-checked later by the config's own code, so a bad value is the config's one-line
    error, not an argparse usage message."""
    comments = field_comments(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    for name, hint in scalar_fields(cls).items():
        if name in skip:
            continue
        flags = (f"--{name.replace('_', '-')}", *(aliases or {}).get(name, ()))
        default = "null" if defaults[name] is None else defaults[name]
        said = f"{comments[name]} " if name in comments else ""
        parser.add_argument(*flags, dest=f"{where}.{name}", default=argparse.SUPPRESS, metavar=hint.__name__.upper(),
                            help=f"{said}({label or where}.{name}; default {default})".replace("%", "%%"))


def add_standalone_arguments(parser: argparse.ArgumentParser, kind: str, source_help: str = SOURCE_HELP) -> None:
    """SOURCE... OUT, the section's fields, --config/--set, --endpoint-url and --no-progress for `preprocess KIND`."""
    where, cls, _ = SECTIONS[kind]
    parser.description = (f"Each option before --config is a field of the `{where}` section of a pipeline config "
                          "(pipeline/config.py), read and checked as `atoken run` reads it; --config FILE takes the "
                          "whole section from a config.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help=source_help)
    parser.add_argument("out", metavar="OUT", help="a folder or s3://bucket/prefix")
    add_section_arguments(parser, cls, where, aliases={"timeout_s": ("--timeout",)})
    if cls is not Objects3DSection:  # 3D sources are plain strings, its limit a field of the section
        add_section_arguments(parser, SourceSection, f"{where}.sources", skip=SOURCE_SAID,
                              label=f"every SOURCE: {where}.sources[*]")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"take the {where} section, storage and ray.preprocess_resources from this pipeline "
                             "config (what `atoken run` runs for the stage); flags given beside it override")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help=f"override one field of --config, e.g. --set {where}.val_every=5 (repeatable)")
    parser.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint (storage.endpoint_url)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--redo", action="store_true",
                        help="OUT was made with other settings (or an older layout): rebuild it from nothing "
                             "(without it such a rerun refuses, naming the setting)")


@dataclass
class StandaloneJob:
    section: IngestSection | VideoIngestSection | Objects3DSection
    config: PipelineConfig  # the section, storage and ray sections the job runs with (start_ray reads ray)
    out: str
    resources: dict[str, float] | None  # --resources, else the config's ray.preprocess_resources
    progress: bool

    @property
    def storage(self) -> Storage:
        from atoken.pipeline.storage import Storage

        return Storage(self.config.storage)


def resolve(kind: str, args: argparse.Namespace) -> StandaloneJob:
    """The section `preprocess KIND` runs: the config's (--config) or the dataclass defaults, with the flags and
    SOURCEs given applied, type-checked and validated as load_config does; before any work."""
    from atoken.pipeline.storage import is_s3

    where, cls, validate = SECTIONS[kind]
    if args.config:
        config = load_config(args.config, args.overrides)
    elif args.overrides:
        raise ConfigError(f"preprocess {kind} --set: overrides a --config FILE; without one, use the flags")
    else:
        config = PipelineConfig()
    raw = dataclasses.asdict(getattr(config, where)) if args.config else {}
    given = {dest.removeprefix(f"{where}."): value for dest, value in vars(args).items()
             if dest.startswith(f"{where}.") and not dest.startswith(f"{where}.sources.")}
    hints = scalar_fields(cls)
    raw.update({name: _value(text, hints[name]) for name, text in given.items()})
    if args.sources:
        raw["sources"] = list(args.sources) if cls is Objects3DSection else [parse_source(s) for s in args.sources]
    elif not args.config:
        raise ConfigError(f"preprocess {kind} SOURCE: give one or more sources, or --config FILE")
    elif not raw.get("sources"):
        raise ConfigError(f"preprocess {kind} SOURCE: {args.config} has no {where}.sources; give one")
    source_flags = {dest.removeprefix(f"{where}.sources."): value for dest, value in vars(args).items()
                    if dest.startswith(f"{where}.sources.")}
    source_hints = scalar_fields(SourceSection)
    for source in raw["sources"] if source_flags else ():
        source.update({name: _value(text, source_hints[name]) for name, text in source_flags.items()})
    try:
        section = section_from_dict(cls, raw, where)
        validate(section)
    except ConfigError as exc:
        raise _named_for_flags(exc, kind, where, set(given), set(source_flags), args.sources) from exc
    if args.endpoint_url:
        config.storage.endpoint_url = args.endpoint_url
    config = dataclasses.replace(config, **{where: section})
    resources = getattr(args, "resources", None) or config.ray.preprocess_resources or None
    out = args.out if is_s3(args.out) else str(Path(args.out).resolve())
    return StandaloneJob(section, config, out, resources, not args.no_progress)


def parse_source(text: str) -> dict[str, Any]:
    """SOURCE → the mapping a config's `sources:` entry holds: builtin:NAME, webdataset:PATH (tars, e.g.
    img2dataset's), parquet:PATH (a table of image bytes), a .tar (webdataset), a list file, s3://..., or a folder.
    Local paths are made absolute, as load_config makes them (Ray workers run elsewhere)."""
    if text.startswith("builtin:"):
        return {"kind": "builtin", "name": text.removeprefix("builtin:")}
    kind = next((k for k in ("webdataset", "parquet") if text.startswith(f"{k}:")), None)
    text = text.removeprefix(f"{kind}:") if kind else text
    s3 = text.startswith("s3://")
    path = text if s3 else str(Path(text.removeprefix("file://")).resolve())
    if kind or Path(text).suffix.lower() == ".tar":
        return {"kind": kind or "webdataset", "path": path}
    if Path(text).suffix.lower() in LIST_SUFFIXES:
        return {"kind": "list", "path": path}
    return {"kind": "s3" if s3 else "folder", "path": path}


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in its class's source: the one on its line, else the comment lines just above it.
    The config's comments are its documentation; the flags' help reads them rather than repeating them."""
    tree, comments, lines = _module_source(cls.__module__)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)
    found = {}
    for item in node.body if node is not None else ():  # a class built at runtime has no source: no comments
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        if item.end_lineno in comments:
            found[item.target.id] = comments[item.end_lineno]
            continue
        above = item.lineno - 1
        while above in comments and lines[above - 1].lstrip().startswith("#"):
            above -= 1
        if above < item.lineno - 1:
            found[item.target.id] = " ".join(comments[n] for n in range(above + 1, item.lineno))
    return found


@functools.cache
def _module_source(module: str) -> tuple[ast.Module, dict[int, str], list[str]]:
    """A module's syntax tree, its comments by line and its lines, read once (the CLI builds three parsers)."""
    try:
        source = inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):
        return ast.Module(body=[], type_ignores=[]), {}, []
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    return ast.parse(source), comments, source.splitlines()


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not dataclasses.MISSING else None


def _value(text: str, hint: type) -> Any:
    """A flag's text as `--set` reads it (YAML), but a string field keeps its text as written."""
    import yaml

    if hint is str:
        return None if text == "null" else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the type check then says what was expected


def _named_for_flags(exc: ConfigError, kind: str, where: str, fields: set[str], source_fields: set[str],
                     sources: list[str]) -> ConfigError:
    """`ingest.val_every: must be >= 2` → `preprocess images --val-every: must be >= 2` where a flag (or SOURCE)
    set that field; a field that came from --config keeps its config path."""
    path, _, message = str(exc).partition(": ")
    field = path.removeprefix(f"{where}.")
    source = re.fullmatch(r"sources(?:\[(\d+)\](?:\.(\w+))?)?", field)
    if field in fields:
        named = f"--{field.replace('_', '-')}"
    elif source and source[2] in source_fields:
        named = f"--{source[2].replace('_', '-')}"
    elif source and sources:
        named = f"SOURCE {sources[int(source[1])]}" if source[1] else "SOURCE"
    else:
        return exc
    return ConfigError(f"preprocess {kind} {named}: {message}")
