"""Load a config from a JSON path, a dict, or ``args.deepspeed_config``; turn pydantic's errors
into messages that name the key and suggest the right one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from shardspeed.config.errors import ConfigError, did_you_mean
from shardspeed.config.schema import ShardspeedConfig

ConfigSource = str | os.PathLike | dict | ShardspeedConfig


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.resolve()}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if 0 < e.lineno <= len(text.splitlines()) else ""
        raise ConfigError(
            f"malformed JSON in {path.resolve()} at line {e.lineno} column {e.colno}: {e.msg}\n"
            f"    {line.strip()}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.resolve()} must hold a JSON object at the top level, got {type(data).__name__}")
    return data


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        names.append(name)
        if info.alias:
            names.append(info.alias)
    return names


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The section class that holds the key at ``loc[-1]``."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = None
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                field = info
        if field is None:
            return None
        ann = field.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                    and issubclass(a, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "config"
        if e["type"] == "extra_forbidden":
            model = _model_at(loc, ShardspeedConfig)
            hint = did_you_mean(str(loc[-1]), _field_names(model)) if model else ""
            lines.append(f"unknown config key '{key}'.{hint}")
        elif e["type"] == "value_error":
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(source: ConfigSource) -> ShardspeedConfig:
    """Build a validated :class:`ShardspeedConfig` from a path, a dict, or an existing config."""
    if isinstance(source, ShardspeedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        data = _read_json(Path(source))
    elif isinstance(source, dict):
        data = source
    else:
        raise ConfigError(f"config must be a path to a JSON file or a dict, got {type(source).__name__}")
    try:
        return ShardspeedConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def config_from_args(args: Any, config: ConfigSource | None) -> ShardspeedConfig:
    """Pick the config from ``initialize(config=...)`` or ``args.deepspeed_config``, not both."""
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is None and args is not None:
        from_args = getattr(args, "shardspeed_config", None)
    if from_args is not None and config is not None:
        raise ConfigError(
            "a config was given twice: in args.deepspeed_config and in initialize(config=...); pass one"
        )
    source = config if config is not None else from_args
    if source is None:
        raise ConfigError(
            "no config: pass initialize(config=path_or_dict) or --deepspeed_config ds_config.json"
        )
    return load_config(source)
