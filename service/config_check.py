"""Configuration you can check: `idverify config`, and the checks `serve` and `migrate` run first.

    idverify config [--no-models]

prints the effective settings (`IDV_` variables; secrets masked, a database password hidden),
then checks them and says `ok` or one line per problem, each naming its `IDV_` variable:

- settings: every `IDV_` value against its type, bounds and allowed values (service/settings.py),
  plus the rules between settings (a bootstrap admin key's length, a usable image key when
  retention is on);
- database (`IDV_DATABASE_URL`): reachable, and at the latest migration;
- models: loaded through the service's one loader (service/face/loader.py: every file against its
  manifest's SHA-256, the fusion's members, the threshold the calibration table gives).

Exit status 0 when all is well, 1 otherwise. `idverify serve` and `idverify migrate` refuse to
start the same way (exit status 2, the same lines on stderr, no traceback) before they touch the
database or load a model: `checked_settings()`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from service.settings import SECRETS, ENV_PREFIX, Settings, describe_errors, env_name, get_settings

CONFIG_ERROR = 2   # exit status of a command refused on its configuration


def load() -> tuple[Settings, list[str], set[str]]:
    """(settings, problems, refused fields). The refused fields take their defaults in the
    settings returned, so that what can still be checked is."""
    try:
        return get_settings(), [], set()
    except ValidationError as exc:
        refused = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        fields = Settings.model_fields
        return Settings(**{f: fields[f].get_default(call_default_factory=True) for f in refused}), \
            describe_errors(exc), refused


def rule_problems(settings: Settings) -> list[str]:
    """The rules between settings that their types cannot say."""
    from service.records import keys, retention

    out = []
    boot = settings.bootstrap_admin_key
    if boot and len(boot) < keys.MIN_BOOTSTRAP_LEN:
        out.append(f"{env_name('bootstrap_admin_key')}: must be at least {keys.MIN_BOOTSTRAP_LEN} characters, "
                   f"not {len(boot)} (e.g. `openssl rand -hex 32`)")
    try:
        retention.cipher_for(settings)
    except retention.RetentionConfigError as exc:   # its messages name their IDV_ variable
        out.append(str(exc) if str(exc).startswith(ENV_PREFIX) else f"{env_name('image_key')}: {exc}")
    return out


def database_problems(settings: Settings) -> tuple[str, list[str]]:
    """(what was found, problems): reachable and at the latest migration. A SQLite file that is
    not there is reported, not created."""
    from sqlalchemy.engine import make_url

    from service.records.engine import make_engine, normalise_url, schema_is_current

    var = env_name("database_url")
    try:
        url = make_url(normalise_url(settings.database_url))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the variable's problem
        return "unreadable", [f"{var}: not a database URL ({exc})"]
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():
        return shown, [f"{var}: no database at {url.database}: run `idverify migrate`"]
    engine = make_engine(settings.database_url)
    try:
        if not schema_is_current(engine):
            return shown, [f"{var}: the database at {shown} is not at the latest migration: run `idverify migrate`"]
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, not a database: one line
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        return shown, [f"{var}: cannot use the database at {shown}: {first}"]
    finally:
        engine.dispose()
    return f"{shown}, at the latest migration", []


def _model_variable(message: str, settings: Settings) -> str:
    """Which setting a model loader's refusal is about, read from its message."""
    if "FAR" in message and "calibration" in message:
        return env_name("far_target")
    if "IDV_THRESHOLD" in message:
        return env_name("threshold")
    for folder, field in ((f"/{settings.detector}/", "detector_version"), ("/sface/", "sface_version"),
                          ("/fusion/", "fusion_version"), (f"/{settings.towers}/", "tower_version")):
        if folder in message:
            return env_name(field)
    return env_name("triton_url") if settings.tower_backend == "triton" else env_name("models_dir")


def load_models(settings: Settings):
    """(models, problems): the served models through the service's own loader (no warm-up), or
    None and one line naming the setting the loader refused."""
    if not Path(settings.models_dir).is_dir():
        return None, [f"{env_name('models_dir')}: no such folder: {settings.models_dir}"]
    from service.face.loader import load_models as load

    try:
        return load(settings), []
    except Exception as exc:  # noqa: BLE001 - a refusal of the loader, named by its variable
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        if message.startswith(ENV_PREFIX):
            return None, [message]
        return None, [f"{_model_variable(message, settings)}: {message}"]


def describe_models(models) -> str:
    t = models.threshold
    far = "no calibration" if t.far is None else f"FAR {t.far:g}"
    return f"{models.model_version} ({models.pipeline.detector_version}), threshold {t.score:.4f} ({far})"


def refuse(problems: list[str]) -> None:
    """Exit CONFIG_ERROR with one line per problem on stderr (no traceback)."""
    for line in problems:
        print(f"idverify: {line}", file=sys.stderr)
    raise SystemExit(CONFIG_ERROR)


def checked_settings(database: bool = False) -> Settings:
    """The settings, or `refuse`: what `serve` and `migrate` run before anything else.
    `database`: also reachable and at the latest migration."""
    settings, problems, _refused = load()
    if not problems:
        problems = rule_problems(settings)
    if not problems and database:
        problems = database_problems(settings)[1]
    if problems:
        refuse(problems)
    return settings


# --- idverify config ------------------------------------------------------------------------

def _shown(field: str, value) -> str:
    if field in SECRETS:
        return "(not set)" if not value else f"(set, {len(str(value))} characters, masked)"
    if field == "database_url":
        from sqlalchemy.engine import make_url

        try:
            return make_url(str(value)).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not a URL: shown without what could be a password
            return str(value).split("@")[-1]
    if isinstance(value, bool):
        return str(value).lower()
    return "(not set)" if value is None else str(value)


def settings_lines(settings: Settings, refused: set[str]) -> list[str]:
    """`* IDV_NAME=value` (from the environment) or `  IDV_NAME=value` (the default)."""
    environ = {k.upper() for k in os.environ}
    lines = []
    for field in Settings.model_fields:
        name = env_name(field)
        mark = "*" if name in environ else " "
        if field in refused:
            given = "(masked)" if field in SECRETS else os.environ.get(name, "")
            lines.append(f"{mark} {name}={given}  <- refused, see below")
        else:
            lines.append(f"{mark} {name}={_shown(field, getattr(settings, field))}")
    return lines


def unknown_variables() -> list[str]:
    known = {env_name(f) for f in Settings.model_fields}
    return sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def register(sub) -> None:
    p = sub.add_parser("config", help="print the effective settings (secrets masked) and check them, "
                                      "the database and the models")
    p.add_argument("--no-models", action="store_true", help="skip loading the models (the slowest check)")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args) -> int:
    settings, problems, refused = load()
    print("settings (* = set in the environment; secrets masked):")
    for line in settings_lines(settings, refused):
        print(line)
    for name in unknown_variables():
        print(f"note: {name} is not an idverify setting (ignored)")
    problems += rule_problems(settings)
    print("checks:")
    print(f"  settings: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    if "database_url" in refused:
        print("  database: not checked (IDV_DATABASE_URL is refused)")
    else:
        found, db = database_problems(settings)
        print(f"  database: {'ok, ' + found if not db else 'problem'}")
        problems += db
    if args.no_models:
        print("  models: not checked (--no-models)")
    elif refused:
        print("  models: not checked (refused settings above)")
    else:
        models, mp = load_models(settings)
        print(f"  models: {'ok, ' + describe_models(models) if not mp else 'problem'}")
        problems += mp
    for line in problems:
        print(f"error: {line}")
    return 1 if problems else 0
