"""LightningCLI's subcommands: one that is not a Trainer method, and ``ckpt_path``.

Pinned: lightning 2.6.6, jsonargparse 4.x.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class CLISeam(LightningCLI):
    """LightningCLI with public hooks for a subcommand of its own and for ``ckpt_path``.

    LightningCLI builds its subcommands from Trainer methods only (``_add_subcommands``,
    ``_run_subcommand``, and ``_setup_parser_kwargs`` for their parser options); ``plan`` must run without a Trainer (it plans for world sizes
    this machine does not have). Its ``_parse_ckpt_path`` torch-loads the checkpoint while
    parsing (a traceback for a damaged file) and merges saved hyperparameters over the
    options given now; the template validates the file itself and lets this launch win.
    """

    def extra_subcommands(self) -> dict[str, str]:
        """Name -> help of subcommands that are not Trainer methods."""
        return {}

    def add_extra_subcommand_arguments(self, name: str, parser: LightningArgumentParser) -> None:
        """Add the options only ``name`` has (the shared ones are already there)."""

    def run_extra_subcommand(self, name: str) -> None:
        raise NotImplementedError(name)

    def _setup_parser_kwargs(self, parser_kwargs: dict[str, Any]) -> tuple[dict, dict]:
        extra = {k: v for k, v in parser_kwargs.items() if k in self.extra_subcommands()}
        rest = {k: v for k, v in parser_kwargs.items() if k not in extra}
        main_kwargs, subcommand_kwargs = super()._setup_parser_kwargs(rest)
        return main_kwargs, {**subcommand_kwargs, **extra}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, help_text in self.extra_subcommands().items():
            sub_parser = self.init_parser(description=help_text, **kwargs.get(name, {}))
            self._add_arguments(sub_parser)
            self.add_extra_subcommand_arguments(name, sub_parser)
            self._subcommand_method_arguments[name] = []
            self._subcommand_parsers[name] = sub_parser
            parser._subcommands_action.add_subcommand(name, sub_parser, help=help_text)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in self.extra_subcommands():
            self.run_extra_subcommand(subcommand)
        else:
            super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        return None
