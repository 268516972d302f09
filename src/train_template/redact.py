"""Secrets stay out of a run's files and output: options that carry one are ``***`` there.

An option carries a secret when its name says so: a part (split at ``_`` and ``.``) that
is ``key``, ``secret``, ``token``, ``password``, ``passwd``, ``credential(s)`` or ``auth``
(``aws_secret_access_key``, ``aws_session_token``, ``api_token``, ``hf_token``,
``password``), at any depth, e.g. inside ``--data.storage_options``. Counts such as
``max_tokens`` or ``tokens_per_sample`` do not match (``tokens`` is not ``token``).

The run itself uses the real values; what is redacted is every copy the template or
Lightning writes or prints:

- ``config.yaml`` (:class:`RedactedConfigSave`, LightningCLI's config callback);
- the hyperparameters the loggers write (``hparams.yaml``, TensorBoard's hparams:
  :func:`redact_loggers`, from ``steps.RunMachinery``) and those every checkpoint keeps
  (``hyper_parameters``, ``datamodule_hyper_parameters``: :func:`redact_checkpoint`, on
  every checkpoint ``planned_trainer.PlannedTrainer`` builds, weights-only ones too);
- every line printed on stdout and stderr, error lines included (:func:`hide_in_output`:
  the values given on the command line and in configs, found before anything runs).

A resume, ``validate``/``test``/``predict`` from a checkpoint and a sweep read the
redacted files and take the secret again from the command line or the environment,
which is where it belongs: the standard ways keep it off command lines altogether
(``AWS_*`` variables, an AWS profile, instance credentials; README "Object storage").
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
_SECRET_PART = re.compile(r"^(key|secret|token|password|passwd|credentials?|auth)$", re.I)


def is_secret_name(name: str) -> bool:
    """True for an option or field name that says it carries a secret."""
    return any(_SECRET_PART.match(part) for part in re.split(r"[_.\-]", str(name)))


def redacted(value: Any, name: str = "") -> Any:
    """A copy of ``value`` with every secret-named entry masked, at any depth (the
    original is never changed: it may be a module's live hyperparameters)."""
    if name and is_secret_name(name) and value is not None and not _is_blank(value):
        return MASK
    if isinstance(value, Mapping):
        return {key: redacted(item, str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(item) for item in value)
    return value


def _is_blank(value: Any) -> bool:
    return isinstance(value, str) and value in ("", MASK)


def secret_values(value: Any, name: str = "") -> set[str]:
    """The secret strings inside ``value`` (a parsed config, a dict of options)."""
    if name and is_secret_name(name) and isinstance(value, str) and len(value) >= 4:
        return {value}
    if isinstance(value, Mapping):
        return set().union(*(secret_values(item, str(key)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return set().union(*(secret_values(item) for item in value))
    return set()


def secrets_in_arguments(args: Iterable[str]) -> set[str]:
    """Secrets on a command line, before it is parsed (a parse error may echo them):
    ``--x.api_token VALUE``, ``--x.api_token=VALUE``, and JSON or YAML option values
    (``--data.storage_options '{"aws_secret_access_key": ...}'``)."""
    import yaml

    found: set[str] = set()
    args = list(args)
    for index, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and index + 1 < len(args):
            name, value = arg[2:], args[index + 1]
        else:
            name, value = "", arg
        found |= secret_values(value, name.rsplit(".", 1)[-1])
        if value[:1] in "{[":
            try:
                found |= secret_values(yaml.safe_load(value))
            except yaml.YAMLError:
                pass
    return found


def masked_command(args: list[str]) -> str:
    """A command line to show or store (a sweep's trial): shell-quoted, secrets masked."""
    import shlex

    shown = shlex.join(args)
    for secret in secrets_in_arguments(args):
        shown = shown.replace(secret, MASK)
    return shown


def namespace_redacted(config: Any) -> Any:
    """A jsonargparse Namespace (a run's config) with its secrets masked, as a copy."""
    copy = config.clone()
    for key in list(copy.keys()):
        value = copy[key]
        masked = redacted(value, key.rsplit(".", 1)[-1])
        if masked is not value:
            copy[key] = masked
    return copy


# -- what the template writes --------------------------------------------------------


def redact_checkpoint(checkpoint: dict) -> None:
    """The module's and data module's saved hyperparameters, masked (new dicts: the
    live hyperparameters keep the real values)."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint[key] = redacted(dict(checkpoint[key]))


def redact_loggers(loggers: Iterable[Any]) -> None:
    """Every logger's ``log_hyperparams`` masks secrets first (``hparams.yaml``,
    TensorBoard's hparams); idempotent."""
    for logger in loggers:
        log = logger.log_hyperparams
        if getattr(log, "redacts", False):
            continue

        def log_redacted(params: Any, *args: Any, _log: Any = log, **kwargs: Any) -> Any:
            if isinstance(params, Mapping):
                params = redacted(dict(params))
            elif hasattr(params, "__dict__"):
                params = redacted(dict(vars(params)))
            return _log(params, *args, **kwargs)

        log_redacted.redacts = True  # type: ignore[attr-defined]
        logger.log_hyperparams = log_redacted


def config_save_callback() -> type:
    """LightningCLI's ``SaveConfigCallback`` writing ``config.yaml`` with secrets masked."""
    from lightning.pytorch.cli import SaveConfigCallback

    class RedactedConfigSave(SaveConfigCallback):
        def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(parser, namespace_redacted(config), *args, **kwargs)

    return RedactedConfigSave


# -- what the process prints ----------------------------------------------------------


class _MaskingStream:
    """A text stream that writes through to ``stream`` with every secret masked; every
    other attribute (encoding, buffer, isatty, ...) is the stream's own."""

    def __init__(self, stream: Any, secrets: set[str]) -> None:
        self.stream = stream
        self.secrets = secrets

    def write(self, text: str) -> int:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def hide_in_output(secrets: set[str]) -> None:
    """Mask ``secrets`` in everything this process prints from now on: ``sys.stdout``,
    ``sys.stderr`` and the logging handlers already bound to them (Lightning's, made at
    its import). Loader workers inherit it; each rank of a run installs its own."""
    if not secrets:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _MaskingStream):
            stream.secrets |= secrets
            continue
        masking = _MaskingStream(stream, set(secrets))
        setattr(sys, name, masking)
        for handler in _stream_handlers():
            if handler.stream is stream:
                handler.setStream(masking)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
    ]
