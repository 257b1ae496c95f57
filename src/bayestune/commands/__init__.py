"""One module per ``bayestune`` subcommand: its flags (``HELP``, ``add_arguments``), its
settings object (``Settings``, built from the parsed flags by ``settings``) and its body
(``run(settings)``). :mod:`bayestune.cli` parses and dispatches (its table,
:data:`bayestune.cli.dispatch.COMMANDS`, names the module of each subcommand); ``common``
holds what the commands that train on a task share.
"""
