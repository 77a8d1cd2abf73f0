"""Config files: shipped configs by name, YAML with `include:`, dotted `key.sub=value` overrides, YAML out."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from goca_fast.config.schema import Config, validate
from goca_fast.config.typed_yaml import ConfigError, build, check_key, merge, parse_override


def shipped_config_dirs() -> list[Path]:
    """Where the shipped configs live: the source tree (editable installs) or the wheel's share/ folder."""
    return [d for d in (Path(__file__).resolve().parents[2] / "configs", Path(sys.prefix) / "share" / "goca_fast" /
                        "configs") if d.is_dir()]


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file by path, or a shipped config by name (`ucf101_r2plus1d`, `demo.yaml`), from any directory."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and os.sep not in text:
        stem = text[:-5] if text.endswith(".yaml") else text
        for d in shipped_config_dirs():
            if (d / f"{stem}.yaml").is_file():
                return d / f"{stem}.yaml"
        names = sorted({p.stem for d in shipped_config_dirs() for p in d.glob("*.yaml")})
        raise ConfigError(f"no config file {text!r} here and no shipped config of that name "
                          f"(shipped: {', '.join(names) or 'none found'})")
    raise ConfigError(f"config file not found: {path}")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a Config from defaults, an optional YAML file (may `include:` another) and dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    for text in overrides:
        upd = parse_override(text)
        check_key(Config, text.split("=", 1)[0].strip().lstrip("-"))
        values = merge(values, upd)
    return validate(build(Config, values))


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings")
    base = values.pop("include", None)
    if base is not None:
        if depth > 8:
            raise ConfigError(f"{path}: include chain too deep")
        values = merge(_read_yaml((path.parent / base).resolve(), depth + 1), values)
    return values


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
