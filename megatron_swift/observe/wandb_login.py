"""Whether WandB has credentials on this machine, judged before any work (a missing login used to surface as a
wandb traceback after the model was built)."""
from __future__ import annotations

import configparser
import netrc
import os
from typing import Dict, Optional
from urllib.parse import urlsplit

_WANDB_HOST = "https://api.wandb.ai"


def wandb_login_problem(wb) -> Optional[str]:
    """Why ``wandb.init`` would stop for want of credentials, or None; ``wb`` is logging.wandb.

    Judged from local state only (no network), before any heavy work, the way wandb looks for a key:
    WANDB_API_KEY (or WANDB_IDENTITY_TOKEN_FILE), then the netrc entry of the W&B host that ``wandb login``
    writes, then an api_key in wandb's settings file. wandb has no public function for this (its lookup
    lives in the private ``wandb.sdk.lib.wbauth``), so it is done here; ``mode=`` passed to wandb.init
    overrides WANDB_MODE, so only logging.wandb.mode decides whether a key is needed."""
    if not wb.project or wb.mode != "online":
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    settings = _wandb_settings()
    host = os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or _WANDB_HOST
    path = _netrc_path()
    if _netrc_has_key(path, host) or settings.get("api_key"):
        return None
    return (f"logging.wandb.project={wb.project} needs a WandB API key and none is set up on this machine "
            f"(no WANDB_API_KEY, no entry for {urlsplit(host).netloc} in {path}): run `wandb login`, or export "
            "WANDB_API_KEY, or log offline with logging.wandb.mode=offline (upload later with `wandb sync`)")


def _wandb_settings() -> Dict[str, str]:
    """The [default] section of wandb's settings file (where `wandb login --host` keeps base_url)."""
    folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(os.path.join(folder, "settings"), encoding="utf-8")
    except (configparser.Error, ValueError):  # a file wandb could not read either: no settings from it
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def _netrc_path() -> str:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc (named even when it does not exist)."""
    if os.environ.get("NETRC"):
        return os.path.expanduser(os.environ["NETRC"])
    for name in (".netrc", "_netrc"):
        path = os.path.join(os.path.expanduser("~"), name)
        if os.path.isfile(path):
            return path
    return os.path.join(os.path.expanduser("~"), ".netrc")


def _netrc_has_key(path: str, host: str) -> bool:
    """Whether the netrc file has a password (the API key) for ``host``'s address; an unreadable file has none,
    as for wandb."""
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(host).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
