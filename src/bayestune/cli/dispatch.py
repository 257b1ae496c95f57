"""Which module runs each subcommand, in the order ``bayestune --help`` lists them.

Each module defines ``HELP`` (its line in that list), ``add_arguments(parser)`` (its flags),
``settings(args)`` (the parsed flags as the command's settings object) and ``run(settings)``;
``module:Name`` names a class with those four in a module that serves two subcommands.
Modules are named, not imported: a command loads only its own module to run, and the
workflow's code hash of a command (:mod:`bayestune.provenance`) covers that module and what it
imports, never another command's flags or help.
"""

COMMANDS = {
    "prepare": "bayestune.commands.prepare",
    "cut-vocabulary": "bayestune.commands.cut_vocabulary",
    "sample": "bayestune.commands.sample",
    "diagnose": "bayestune.commands.diagnose",
    "compare-chains": "bayestune.commands.compare_chains",
    "mask": "bayestune.commands.mask",
    "finetune": "bayestune.commands.finetune",
    "apply-delta": "bayestune.commands.apply_delta",
    "report": "bayestune.commands.report",
    "figures": "bayestune.commands.report:Figures",
    "bench": "bayestune.commands.bench",
    "plan": "bayestune.commands.plan",
    "render-jobs": "bayestune.commands.render_jobs",
    "carry-model": "bayestune.commands.carry_model",
    "run-jobs": "bayestune.commands.run_jobs",
    "sweep": "bayestune.commands.sweep",
}
