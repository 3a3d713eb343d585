"""The settings base every package shares: its own section of `tessera.yaml` under env vars.

Kept apart from `server/` so that vLLM worker processes (which read `attention:` settings in
the plugin) never import the gateway package.

Precedence (highest first): explicit values (CLI flags), environment variables with the
section's prefix, the section of the YAML file named by `TESSERA_CONFIG` (default
`./tessera.yaml` when it exists), then the field defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource

CONFIG_ENV = "TESSERA_CONFIG"
DEFAULT_CONFIG_FILE = "tessera.yaml"


def config_file() -> Path | None:
    """The YAML config in force: `TESSERA_CONFIG`, else ./tessera.yaml if present."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def _has_section(path: Path, section: str) -> bool:
    import yaml

    if not path.exists():
        return True  # let pydantic-settings report the missing file as before
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and section in data


class TesseraSettings(BaseSettings):
    """Base of each package's settings: its own section of tessera.yaml under env vars.

    Subclasses set `yaml_section` and an `env_prefix`; explicit values beat env vars, which
    beat the YAML file, which beats the field defaults.
    """

    yaml_section: ClassVar[str]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_file()
        if path is None or not _has_section(path, cls.yaml_section):
            # A file may configure some packages only: a missing section means defaults.
            return init_settings, env_settings
        yaml_source = YamlConfigSettingsSource(
            settings_cls, yaml_file=path, yaml_config_section=cls.yaml_section
        )
        return init_settings, env_settings, yaml_source
